"""The Backbone contract over torchvision, timm and the offline EfficientNet-Lite0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tl_lightning.backbones import build_backbone, resolve_data_config

TORCHVISION = {
    # name: (feature_dim, first groups, last group, probe size)
    "resnet18": (512, ["stem", "layer1"], "layer4", 64),
    "resnet34": (512, ["stem", "layer1"], "layer4", 64),
    "resnet50": (2048, ["stem", "layer1"], "layer4", 64),
    "vgg16": (4096, ["block1", "block2"], "fc7", 64),
    "densenet121": (1024, ["stem", "block1"], "block4", 64),
    "efficientnet_b0": (1280, ["stem", "stage1"], "head_conv", 64),
    "mobilenet_v3_large": (1280, ["stem", "stage1"], "classifier", 64),
    "vit_b_16": (768, ["embed", "block0"], "norm", 224),
}


def _covers_all_params(bb) -> None:
    grouped = [p for g in bb.layer_groups() for p in g.params]
    assert len({id(p) for p in grouped}) == len(grouped), "a parameter is in two groups"
    assert {id(p) for p in grouped} == {id(p) for p in bb.parameters()}, "a parameter is in no group"


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_contract(name):
    dim, first, last, size = TORCHVISION[name]
    bb = build_backbone(name, weights=None).eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim) == (2, bb.feature_dim)
    names = bb.group_names()
    assert names[: len(first)] == first and names[-1] == last
    _covers_all_params(bb)
    cfg = bb.data_config
    assert cfg.input_size == 224 and len(cfg.mean) == 3 and 0 < cfg.crop_pct <= 1


def test_preprocessing_comes_from_the_weights_enum():
    v1 = resolve_data_config("resnet50", "IMAGENET1K_V1")
    v2 = resolve_data_config("resnet50", "IMAGENET1K_V2")
    assert v1.crop_pct == pytest.approx(224 / 256) and v2.crop_pct == pytest.approx(224 / 232)
    assert resolve_data_config("vit_b_16", None).fixed_input_size


def test_timm_model_by_name_with_groups_and_pretrained_cfg():
    bb = build_backbone("timm/resnet18", weights=None)
    assert bb.feature_dim == 512
    assert bb.group_names() == ["stem", "layer1", "layer2", "layer3", "layer4"]
    _covers_all_params(bb)
    assert bb.data_config.interpolation in ("bilinear", "bicubic")


@pytest.mark.parametrize(
    ("name", "layer", "dim"), [("resnet18", "layer3", 256), ("timm/resnet18", "layer2", 128)]
)
def test_intermediate_layer_features(name, layer, dim):
    bb = build_backbone(name, weights=None, layer=layer)
    assert bb.feature_dim == dim
    assert bb(torch.randn(2, 3, 64, 64)).shape == (2, dim)
    assert "layer4" not in bb.group_names()  # groups after the cut hold no parameters


def test_unknown_names_suggest_the_closest():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        build_backbone("resnet5O", weights=None)
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        build_backbone("resnet50", weights="IMAGENET1K_V3")
    with pytest.raises(ValueError, match="layer 'layer9' not in resnet18"):
        build_backbone("resnet18", weights=None, layer="layer9")


def test_offline_efficientnet_lite0_has_its_own_preprocessing():
    bb = build_backbone("efficientnet_lite0")
    assert bb.feature_dim == 1280
    assert bb.data_config.mean == (0.5, 0.5, 0.5) and bb.data_config.interpolation == "bicubic"
    assert bb.group_names()[0] == "stem" and bb.group_names()[-1] == "neck"
    assert len(bb.group_names()) == 9  # stem, 7 stages, neck (head conv + BN)
    _covers_all_params(bb)


def test_freeze_policies_and_unfreeze():
    bb = build_backbone("resnet18", weights=None)
    bb.freeze(["stem", "layer1"], bn="eval")
    assert bb.frozen_group_names() == ["stem", "layer1"]
    bb.train()
    assert not bb.body.bn1.training and bb.body.layer2[0].bn1.training
    bb.freeze(["layer2"], bn="affine")
    bb.train()
    assert not bb.body.layer2[0].bn1.training and bb.body.layer2[0].bn1.weight.requires_grad
    assert not bb.body.layer2[0].conv1.weight.requires_grad
    bb.freeze(["layer3"], bn="stats")
    bb.train()
    assert bb.body.layer3[0].bn1.training and not bb.body.layer3[0].bn1.weight.requires_grad
    bb.unfreeze()
    bb.train()
    assert all(p.requires_grad for p in bb.parameters()) and bb.body.bn1.training
    with pytest.raises(ValueError, match="not found"):
        bb.freeze(["layer7"])
    with pytest.raises(ValueError):
        bb.freeze(bn="sometimes")


def test_eval_policy_keeps_bn_statistics_through_train_mode():
    bb = build_backbone("resnet18", weights=None)
    bb.freeze(bn="eval")
    before = {k: v.clone() for k, v in bb.state_dict().items() if "running" in k}
    bb.train()
    bb(torch.randn(4, 3, 32, 32) * 3 + 1)
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_regex_group_selection():
    bb = build_backbone("resnet18", weights=None)
    assert [g.name for g in bb.select_groups([r"layer[34]"])] == ["layer3", "layer4"]


def test_tied_parameters_are_counted_once():
    from tl_lightning.backbones.backbone import group_by_prefixes

    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    groups = group_by_prefixes(model, [("a", ["0"]), ("b", ["2"])])
    assert [g.name for g in groups] == ["a"] and len(groups[0].params) == 2
