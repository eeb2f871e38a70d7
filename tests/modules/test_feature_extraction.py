"""FeatureExtractionModule: frozen means frozen (weights and BN statistics), only the head trains."""

from __future__ import annotations

import torch

from tests.helpers import TINY, quick_trainer, tiny_digits
from tl_lightning.modules import FeatureExtractionModule


def test_backbone_weights_and_bn_statistics_stay_put(tmp_path):
    model = FeatureExtractionModule(num_classes=10, **TINY)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = [p.clone() for p in model.head.parameters()]
    quick_trainer(tmp_path, limit_train_batches=5).fit(model, tiny_digits())
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone changed (weights or BN stats)"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters())), "head did not train"


def test_backbone_is_in_eval_mode_even_after_train():
    model = FeatureExtractionModule(num_classes=10, **TINY)
    model.train()
    assert model.head.training
    assert not any(m.training for m in model.backbone.modules())


def test_only_the_head_is_optimised():
    model = FeatureExtractionModule(num_classes=10, **TINY)
    optimizer = model.configure_optimizers()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in model.head.parameters()}
    assert [g["name"] for g in optimizer.param_groups] == ["head"]


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    model = FeatureExtractionModule(num_classes=10, channels_last=True, **TINY)
    quick_trainer(tmp_path, precision="bf16-mixed", limit_train_batches=1, limit_val_batches=1).fit(model, tiny_digits())
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_mlp_head_shape():
    model = FeatureExtractionModule(num_classes=3, head="mlp", head_hidden_dim=16, head_dropout=0.2, **TINY)
    layers = [type(m).__name__ for m in model.head]
    assert layers == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
