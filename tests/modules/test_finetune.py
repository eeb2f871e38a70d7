"""FineTuneModule: discriminative LRs per layer group, partial training, named param groups."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY, quick_trainer, tiny_digits
from tl_lightning.modules import FineTuneModule


def _lrs(model) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in model.configure_optimizers().param_groups}


def test_lr_decays_once_per_group_not_per_tensor():
    model = FineTuneModule(num_classes=10, lr_decay=0.5, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **TINY)
    lrs = _lrs(model)
    assert list(lrs) == ["head", "backbone.layer4", "backbone.layer3", "backbone.layer2", "backbone.layer1", "backbone.stem"]
    expected = [0.1 * 0.5**i for i in range(6)]
    assert list(lrs.values()) == pytest.approx(expected)


def test_explicit_group_lrs_win():
    model = FineTuneModule(num_classes=10, group_lrs={"layer4": 1e-4, "head": 3e-3}, **TINY)
    lrs = _lrs(model)
    assert lrs["head"] == 3e-3 and lrs["backbone.layer4"] == 1e-4 and lrs["backbone.layer3"] == 1e-3


def test_train_last_groups_only(tmp_path):
    model = FineTuneModule(num_classes=10, train_groups=1, **TINY)
    assert list(_lrs(model)) == ["head", "backbone.layer4"]
    stem_before = model.backbone.body.conv1.weight.clone()
    bn_before = model.backbone.body.layer1[0].bn1.running_mean.clone()
    top_before = model.backbone.body.layer4[1].conv2.weight.clone()
    quick_trainer(tmp_path).fit(model, tiny_digits())
    assert torch.equal(model.backbone.body.conv1.weight, stem_before)
    assert torch.equal(model.backbone.body.layer1[0].bn1.running_mean, bn_before)
    assert not torch.equal(model.backbone.body.layer4[1].conv2.weight, top_before)


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="lr_decay"):
        FineTuneModule(num_classes=10, lr_decay=1.5, **TINY)
    with pytest.raises(ValueError, match="layer9"):
        FineTuneModule(num_classes=10, group_lrs={"layer9": 0.1}, **TINY)
    with pytest.raises(ValueError, match="train_groups must be in 0..5"):
        FineTuneModule(num_classes=10, train_groups=9, **TINY)
