"""The classifier loss by hand: soft (MixUp/CutMix) targets, label smoothing and class weights, element by element."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import TINY
from tl_lightning.modules.feature_extraction import FeatureExtractionModule

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
SOFT = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.5, 0.0, 0.5]])  # MixUp pairs


def _log_softmax(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def _explicit(logits, target, smoothing=0.0, weight=None):
    """sum_c w_c * q_c * -log p_c per sample, q = (1 - eps) t + eps / C; the mean over samples."""
    n, c = len(logits), len(logits[0])
    weight = weight or [1.0] * c
    total = 0.0
    for row, t in zip(logits, target):
        logp = _log_softmax(row)
        q = [(1 - smoothing) * t[k] + smoothing / c for k in range(c)]
        total += -sum(weight[k] * q[k] * logp[k] for k in range(c))
    return total / n


def _model(**kw):
    return FeatureExtractionModule(num_classes=3, channels_last=False, **TINY, **kw)


def test_soft_target_loss_is_the_cross_entropy_against_the_mixture():
    expected = _explicit(LOGITS.tolist(), SOFT.tolist())
    assert _model().loss(LOGITS, SOFT).item() == pytest.approx(expected, rel=1e-6)
    # hand-worked first row: 0.7 * -log p0 + 0.3 * -log p1
    p = torch.softmax(LOGITS[0], 0).tolist()
    assert expected * 3 - _explicit(LOGITS[1:].tolist(), SOFT[1:].tolist()) * 2 == pytest.approx(
        -0.7 * math.log(p[0]) - 0.3 * math.log(p[1]), rel=1e-6
    )


def test_soft_targets_with_label_smoothing_and_class_weights():
    model = _model(label_smoothing=0.2, class_weights=[1.0, 2.0, 0.5])
    expected = _explicit(LOGITS.tolist(), SOFT.tolist(), 0.2, [1.0, 2.0, 0.5])
    assert model.loss(LOGITS, SOFT).item() == pytest.approx(expected, rel=1e-6)


def test_a_one_hot_soft_target_equals_its_hard_label_loss():
    hard = torch.tensor([0, 2, 1])
    model = _model(label_smoothing=0.1)
    soft = torch.nn.functional.one_hot(hard, 3).float()
    expected = _explicit(LOGITS.tolist(), soft.tolist(), 0.1)
    assert model.loss(LOGITS, hard).item() == pytest.approx(expected, rel=1e-6)
    assert model.loss(LOGITS, soft).item() == pytest.approx(expected, rel=1e-6)
