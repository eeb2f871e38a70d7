"""How far the data are from the pretraining: frozen-feature accuracy and BatchNorm statistics.

Three measures of one frozen backbone on the training split, all in seconds once it is embedded:

- a k-fold linear probe (closed-form ridge on one-hot targets, :mod:`.ridge`; its strength picked
  by leave-one-out inside the first training part): what feature extraction can reach;
- a k-fold k-NN accuracy (cosine): how well the pretrained geometry alone groups the classes;
- the BatchNorm shift (:mod:`.bn_stats`): how far each BN layer's input statistics on these images
  are from its pretrained running statistics, in units of the running standard deviation. Large values mean
  frozen BN layers normalise these images badly (why ``bn: eval`` hurts on digits and ``stats``
  helps: benchmarks/unfreezing.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_lightning.advisor.bn_stats import BatchNormInputs
from tl_lightning.advisor.ridge import choose_ridge_l2, kfold_ridge_logits
from tl_lightning.data.split import stratified_split


@dataclass
class Distance:
    """Frozen-feature accuracies (k-fold, on the training split) and the BatchNorm shift."""

    probe_acc: float
    knn_acc: float
    bn_shift: float
    folds: int


def fold_indices(labels: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """``folds`` disjoint stratified parts of ``range(len(labels))`` (seeded)."""
    return stratified_split(labels, [1.0 / folds] * folds, seed)


def choose_folds(labels: np.ndarray, folds: int) -> int:
    """At most ``folds``, at least 2, and no more than the smallest class has images."""
    counts = np.bincount(labels)
    return max(2, min(folds, int(counts[counts > 0].min())))


def kfold_probe_accuracy(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, folds: int, seed: int = 0
) -> float:
    """Held-out accuracy of a linear probe (closed-form ridge on one-hot targets), pooled over
    ``folds`` folds.

    Each fold's probe is fit on the other folds. The ridge strength is picked once, by exact
    leave-one-out accuracy on the first fold's training part (never on a held-out fold), and
    reused in every fold.
    """
    y = labels.numpy()
    parts = fold_indices(y, folds, seed)
    first_rest = np.concatenate(parts[1:])
    l2 = choose_ridge_l2(features[first_rest], labels[first_rest], num_classes)
    logits = kfold_ridge_logits(features, labels, num_classes, parts, l2)
    correct = sum(
        int((scores.argmax(1) == labels[held]).sum())
        for scores, held in zip(logits, parts, strict=True)
    )
    return correct / len(y)


def kfold_knn_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    folds: int,
    k: int = 10,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a cosine k-NN majority vote, pooled over ``folds`` folds."""
    y = labels.numpy()
    unit = F.normalize(features.float(), dim=1)
    correct = 0
    for held in fold_indices(y, folds, seed):
        mask = np.ones(len(y), bool)
        mask[held] = False
        sims = unit[held] @ unit[mask].T
        top = sims.topk(min(k, int(mask.sum())), dim=1).indices
        votes = F.one_hot(labels[mask][top], num_classes).sum(1)
        correct += int((votes.argmax(1) == labels[held]).sum())
    return correct / len(y)


@torch.no_grad()
def batchnorm_shift(backbone: nn.Module, batches: Iterable[torch.Tensor]) -> float:
    """:meth:`BatchNormInputs.shift` over a separate pass of ``batches``, the whole network in eval
    mode (what a frozen ``bn: eval`` backbone sees). ``advise`` gathers the same statistics during
    its embedding pass instead (no pass of their own)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with BatchNormInputs(backbone) as bn:
            for x in batches:
                backbone(x)
    finally:
        backbone.train(was_training)
    return bn.shift()
