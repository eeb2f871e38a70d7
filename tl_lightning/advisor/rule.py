"""The recommendation: a pure function from the measured numbers to a strategy and its settings.

Fixed before any benchmark was run (thresholds below, with why); it never sees test labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# A linear probe this good (k-fold, on the training split) leaves at most a few points to gain
# from training the backbone, and feature extraction is by far the cheapest and safest.
PROBE_ENOUGH = 0.95
# Fewer training images per class than this: training backbone weights overfits; keep them
# frozen except the last groups (far data) or all of them (near data).
FEW_PER_CLASS = 10
# Fine-tuning needs a few passes over the data to beat a trained head; fewer fit in the budget:
# train fewer groups.
MIN_EPOCHS = 3
# BatchNorm shift (mean |z| of BN input statistics over the training split vs the pretrained
# running ones, see bn_stats.BatchNormInputs.shift) from which frozen BN layers re-estimate their statistics (``bn: stats``)
# and the data count as far from the pretraining. Calibrated on unlabelled images only, for
# EfficientNet-Lite0: crops of scikit-image's natural photos give 0.90 / 0.57 / 0.30 at 32 / 64 /
# 224 px, Gaussian noise 1.5 / 1.3 / 1.3; 1.0 is above natural photos at every size.
BN_FAR = 1.0
# A k-fold linear probe below this also means far: the pretrained features do not separate the
# classes, whatever their BatchNorm statistics (added after seeing digits-M's train-split probe
# 0.42 with a BN shift of 1.00, before any benchmark run; no test label was looked at).
PROBE_FAR = 0.6
MAX_EPOCHS = 30  # cap: a budget that allows more still stops here
FE_EPOCHS = 30  # epochs of a head on cached features (each costs milliseconds)
MIN_STEPS_PER_EPOCH = 4  # lower the batch size until an epoch has this many steps

STRATEGIES = ("feature_extraction", "last_groups", "full_finetune", "gradual_unfreezing")

DEFAULT_LR = {
    "feature_extraction": 3e-3,
    "last_groups": 2e-3,
    "full_finetune": 2e-3,
    "gradual_unfreezing": 2e-3,
}


@dataclass(frozen=True)
class Evidence:
    """Everything the rule looks at (measured by :func:`tl_lightning.advisor.advise`)."""

    num_train: int
    num_classes: int
    per_class_min: int
    probe_acc: float
    knn_acc: float
    bn_shift: float
    epoch_seconds: dict[str, float]  # one (train + val) epoch of each strategy, measured
    budget_seconds: float
    num_groups: int
    batch_size: int
    device: str = "cpu"  # "cpu" or "cuda"
    lr: float | None = None  # from lr_find when asked; else the strategy's default


@dataclass
class Recommendation:
    """The advised strategy and settings, with ``(measure, value, conclusion)`` reasons."""

    strategy: str
    train_groups: int | None
    bn: str
    epochs: int
    batch_size: int
    precision: str
    lr: float
    reasons: list[tuple[str, str, str]] = field(default_factory=list)


def last_groups_count(num_groups: int) -> int:
    """How many top groups "fine-tune the last groups" trains: a quarter of them, at least one
    (EfficientNet-Lite0: ``blocks.6`` and ``neck``, the seeds' "last block"; ResNet: ``layer4``)."""
    return max(1, round(num_groups / 4))


def seeds_size_rule(num_train: int) -> str:
    """The seeds' ``select_pretrained_model`` advice from the data size alone (for comparison)."""
    if num_train < 1000:
        return "feature_extraction"
    if num_train < 10000:
        return "last_groups"
    return "full_finetune"


def affordable_epochs(budget_seconds: float, epoch_seconds: float) -> int:
    """Whole epochs that fit the budget (0 when not even one does)."""
    return int(budget_seconds // epoch_seconds) if epoch_seconds > 0 else MAX_EPOCHS


def advised_batch_size(num_train: int, batch_size: int) -> int:
    """``batch_size``, halved (power of two) until an epoch has ``MIN_STEPS_PER_EPOCH`` steps."""
    limit = max(1, num_train // MIN_STEPS_PER_EPOCH)
    if batch_size <= limit:
        return batch_size
    return max(1, 2 ** int(math.log2(limit)))


def recommend(e: Evidence) -> Recommendation:
    """The strategy for evidence ``e``; the same numbers always give the same advice.

    Order of the questions: (1) are frozen features already enough? (2) does the time budget
    allow training the backbone at all? (3) are there enough images per class to train it?
    (4) far from the pretraining -> full fine-tune, near -> gradual unfreezing.

    Example:
        >>> e = Evidence(5000, 10, 500, 0.97, 0.95, 0.4, {"feature_extraction": 5.0,
        ...     "last_groups": 9.0, "full_finetune": 20.0, "gradual_unfreezing": 20.0}, 600, 9, 64)
        >>> recommend(e).strategy
        'feature_extraction'
    """
    reasons: list[tuple[str, str, str]] = []
    bn_far = e.bn_shift >= BN_FAR
    far = bn_far or e.probe_acc < PROBE_FAR
    reasons.append(
        (
            "BatchNorm shift",
            f"{e.bn_shift:.2f}",
            f"{'>=' if bn_far else '<'} {BN_FAR}: BN statistics {'far from' if bn_far else 'close to'} "
            f"the pretrained ones (bn: {'stats' if bn_far else 'eval'})",
        )
    )
    full_epochs = affordable_epochs(e.budget_seconds, e.epoch_seconds["full_finetune"])
    last_epochs = affordable_epochs(e.budget_seconds, e.epoch_seconds["last_groups"])
    if e.probe_acc >= PROBE_ENOUGH:
        strategy = "feature_extraction"
        reasons.append(
            (
                "linear probe (k-fold)",
                f"{e.probe_acc:.3f}",
                f">= {PROBE_ENOUGH}: frozen features suffice",
            )
        )
    else:
        reasons.append(
            (
                "linear probe (k-fold)",
                f"{e.probe_acc:.3f}",
                f"< {PROBE_ENOUGH}: training the backbone can gain"
                + (
                    f"; < {PROBE_FAR}: features far from these classes"
                    if e.probe_acc < PROBE_FAR
                    else ""
                ),
            )
        )
        if full_epochs < MIN_EPOCHS:
            strategy = "last_groups" if last_epochs >= MIN_EPOCHS else "feature_extraction"
            reasons.append(
                (
                    "full fine-tune epochs in budget",
                    f"{full_epochs} (last groups: {last_epochs})",
                    f"< {MIN_EPOCHS}: train {'only the last groups' if strategy == 'last_groups' else 'the head only'}",
                )
            )
        elif e.per_class_min < FEW_PER_CLASS:
            strategy = "last_groups" if far else "feature_extraction"
            reasons.append(
                (
                    "training images in the smallest class",
                    str(e.per_class_min),
                    f"< {FEW_PER_CLASS}: too few to train the whole backbone",
                )
            )
        else:
            strategy = "full_finetune" if far else "gradual_unfreezing"
            reasons.append(
                (
                    "training images in the smallest class",
                    str(e.per_class_min),
                    f">= {FEW_PER_CLASS}: enough to train the backbone "
                    f"({'all at once: the data are far' if far else 'gradually: keep the near features first'})",
                )
            )
    return settings_for(strategy, e, reasons)


def settings_for(
    strategy: str, e: Evidence, reasons: list[tuple[str, str, str]] | None = None
) -> Recommendation:
    """Everything but the strategy, for ``strategy`` under evidence ``e``: epochs fitted to the
    budget, BN policy, batch size, precision and LR (also used to run every strategy fairly in
    benchmarks/advise.py)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; valid: {list(STRATEGIES)}")
    reasons = list(reasons or [])
    if strategy == "feature_extraction":
        epochs = FE_EPOCHS
    else:
        epochs = min(
            MAX_EPOCHS, max(1, affordable_epochs(e.budget_seconds, e.epoch_seconds[strategy]))
        )
    reasons.append(
        (
            f"{strategy} epoch (measured)",
            f"{e.epoch_seconds[strategy]:.1f} s",
            f"{epochs} epochs in the {e.budget_seconds:.0f} s budget"
            + (" (later epochs read cached features)" if strategy == "feature_extraction" else ""),
        )
    )
    # bf16 autocast trains EfficientNets slower on CPUs (BENCHMARKS.md); frozen forward passes gain
    trains_backbone = strategy != "feature_extraction"
    return Recommendation(
        strategy=strategy,
        train_groups=last_groups_count(e.num_groups) if strategy == "last_groups" else None,
        bn="stats" if e.bn_shift >= BN_FAR else "eval",
        epochs=epochs,
        batch_size=advised_batch_size(e.num_train, e.batch_size),
        precision="32-true" if trains_backbone and e.device == "cpu" else "mixed",
        lr=e.lr if e.lr is not None else DEFAULT_LR[strategy],
        reasons=reasons,
    )
