"""The recommendation is a pure function of the numbers: hand-made evidence at every boundary."""

from __future__ import annotations

import dataclasses

import pytest

from tl_lightning.advisor import rule
from tl_lightning.advisor.rule import Evidence, recommend, seeds_size_rule, settings_for

EPOCH = {
    "feature_extraction": 2.0,
    "last_groups": 4.0,
    "full_finetune": 10.0,
    "gradual_unfreezing": 10.0,
}


def ev(**changes) -> Evidence:
    base = Evidence(
        num_train=1000,
        num_classes=10,
        per_class_min=100,
        probe_acc=0.8,
        knn_acc=0.7,
        bn_shift=0.5,
        epoch_seconds=dict(EPOCH),
        budget_seconds=600.0,
        num_groups=9,
        batch_size=64,
    )
    return dataclasses.replace(base, **changes)


def test_probe_at_the_enough_boundary():
    assert recommend(ev(probe_acc=0.95)).strategy == "feature_extraction"
    assert recommend(ev(probe_acc=0.9499)).strategy == "gradual_unfreezing"  # near, enough data


def test_far_by_batchnorm_shift_boundary():
    at = recommend(ev(bn_shift=1.0))
    below = recommend(ev(bn_shift=0.999))
    assert (at.strategy, at.bn) == ("full_finetune", "stats")
    assert (below.strategy, below.bn) == ("gradual_unfreezing", "eval")


def test_far_by_probe_boundary_keeps_bn_eval():
    far = recommend(ev(probe_acc=0.5999))
    near = recommend(ev(probe_acc=0.6))
    assert (far.strategy, far.bn) == ("full_finetune", "eval")  # BN statistics were close
    assert near.strategy == "gradual_unfreezing"


def test_budget_boundary_for_full_fine_tuning():
    # exactly 3 full epochs fit (30 s / 10 s) -> full; 29.99 s -> only 2 -> last groups (7 epochs fit)
    assert recommend(ev(bn_shift=2.0, budget_seconds=30.0)).strategy == "full_finetune"
    short = recommend(ev(bn_shift=2.0, budget_seconds=29.99))
    assert (short.strategy, short.train_groups, short.epochs) == ("last_groups", 2, 7)
    # last groups: exactly 3 epochs (12 s / 4 s) vs fewer -> feature extraction
    assert recommend(ev(budget_seconds=12.0)).strategy == "last_groups"
    assert recommend(ev(budget_seconds=11.99)).strategy == "feature_extraction"


def test_images_per_class_boundary():
    assert recommend(ev(per_class_min=10, bn_shift=2.0)).strategy == "full_finetune"
    assert recommend(ev(per_class_min=9, bn_shift=2.0)).strategy == "last_groups"
    assert recommend(ev(per_class_min=10)).strategy == "gradual_unfreezing"
    assert recommend(ev(per_class_min=9)).strategy == "feature_extraction"


def test_epochs_fit_the_budget_and_are_capped():
    # 600 s / 10 s = 60 affordable -> capped at 30; 95 s -> 9
    assert recommend(ev(bn_shift=2.0)).epochs == rule.MAX_EPOCHS == 30
    assert recommend(ev(bn_shift=2.0, budget_seconds=95.0)).epochs == 9
    assert recommend(ev(probe_acc=0.99)).epochs == rule.FE_EPOCHS


def test_batch_size_halves_until_four_steps_per_epoch():
    assert recommend(ev(num_train=256)).batch_size == 64  # 256 / 4 = 64: keeps 64
    assert recommend(ev(num_train=255)).batch_size == 32  # 63 -> largest power of two below
    assert recommend(ev(num_train=108)).batch_size == 16  # 27 -> 16
    assert recommend(ev(num_train=3)).batch_size == 1


def test_precision_follows_device_and_strategy():
    assert recommend(ev(bn_shift=2.0)).precision == "32-true"  # training an EfficientNet on a CPU
    assert recommend(ev(bn_shift=2.0, device="cuda")).precision == "mixed"
    assert recommend(ev(probe_acc=0.99)).precision == "mixed"  # frozen forward passes


def test_lr_from_lr_find_wins_over_the_default():
    assert recommend(ev()).lr == rule.DEFAULT_LR["gradual_unfreezing"]
    assert recommend(ev(lr=3.3e-4)).lr == 3.3e-4


def test_same_numbers_same_advice_and_reasons_carry_the_numbers():
    a, b = (
        recommend(ev(bn_shift=1.234, probe_acc=0.812)),
        recommend(ev(bn_shift=1.234, probe_acc=0.812)),
    )
    assert a == b
    values = [value for _, value, _ in a.reasons]
    assert "1.23" in values and "0.812" in values


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (999, "feature_extraction"),
        (1000, "last_groups"),
        (9999, "last_groups"),
        (10000, "full_finetune"),
    ],
)
def test_seeds_size_rule_boundaries(n, expected):
    assert seeds_size_rule(n) == expected


def test_settings_for_any_strategy_and_unknown_name():
    assert settings_for("last_groups", ev(num_groups=5)).train_groups == 1  # ResNet: layer4
    assert settings_for("full_finetune", ev()).train_groups is None
    with pytest.raises(ValueError, match="unknown strategy 'finetune'.*full_finetune"):
        settings_for("finetune", ev())
