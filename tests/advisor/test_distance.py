"""Frozen-feature accuracies and the BatchNorm shift against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from tl_lightning.advisor.distance import (
    batchnorm_shift,
    choose_folds,
    fold_indices,
    kfold_knn_accuracy,
    kfold_probe_accuracy,
)


def blobs(n_per_class: int, separation: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(3, 8) * separation
    x = torch.cat([centres[c] + torch.randn(n_per_class, 8, generator=g) for c in range(3)])
    y = torch.arange(3).repeat_interleave(n_per_class)
    return x, y


def test_separable_classes_score_one_and_shuffled_labels_score_near_chance():
    x, y = blobs(30, separation=20.0)
    assert kfold_probe_accuracy(x, y, 3, folds=5) == 1.0
    assert kfold_knn_accuracy(x, y, 3, folds=5) == 1.0
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    assert kfold_probe_accuracy(x, shuffled, 3, folds=5) < 0.6
    assert kfold_knn_accuracy(x, shuffled, 3, folds=5) < 0.6


def test_probe_is_scored_on_held_out_folds_only():
    # random labels on 64-d random features: a probe memorises its training folds (train accuracy
    # near 1) but can only guess on a held-out fold (chance 1/3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 64, generator=g), torch.randint(0, 3, (60,), generator=g)
    assert kfold_probe_accuracy(x, y, 3, folds=3) < 0.6


def test_knn_is_held_out_and_matches_an_explicit_loop():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [-0.99, 0.1]])
    # each fold holds one point per class; a held-out point's same-class partner is in the
    # other fold, so 1-NN is always right
    assert kfold_knn_accuracy(x, torch.tensor([0, 0, 1, 1]), 2, folds=2, k=1) == 1.0
    # labels that disagree with the geometry: an explicit leave-fold-out 1-NN loop decides
    y = torch.tensor([0, 1, 1, 0])
    correct = 0
    for held in fold_indices(y.numpy(), 2):
        rest = np.setdiff1d(np.arange(4), held)
        for i in held:
            cos = [float(torch.nn.functional.cosine_similarity(x[i], x[j], dim=0)) for j in rest]
            correct += int(y[rest[int(np.argmax(cos))]] == y[i])
    assert kfold_knn_accuracy(x, y, 2, folds=2, k=1) == correct / 4


def test_folds_are_capped_by_the_smallest_class():
    assert choose_folds(np.array([0] * 20 + [1] * 3), 5) == 3
    assert choose_folds(np.array([0] * 20 + [1] * 1), 5) == 2
    assert choose_folds(np.array([0] * 20 + [1] * 20), 5) == 5


def test_batchnorm_shift_equals_the_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(2))
    bn = net[0]
    bn.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0]))
    bn.eps = 0.0
    x = torch.randn(64, 2, 8, 8)
    x[:, 0] = x[:, 0] * 3.0 + 2.0
    x[:, 1] = x[:, 1] * 0.5 - 1.0
    # by hand, from the actual sample moments (population variance) of what went in
    expected = 0.0
    for c, (mu_run, sd_run) in enumerate([(0.0, 1.0), (1.0, 2.0)]):
        v = x[:, c].double().flatten()
        mu, sd = float(v.mean()), math.sqrt(float(((v - v.mean()) ** 2).mean()))
        expected += abs(mu - mu_run) / sd_run + abs(math.log(sd / sd_run))
    expected /= 2
    got = batchnorm_shift(net, [x[:20], x[20:]])  # two batches: statistics pooled over both
    assert abs(got - expected) < 1e-4
    assert not net.training or bn.training  # mode restored


def test_batchnorm_shift_is_zero_on_the_pretraining_statistics():
    net = nn.Sequential(nn.BatchNorm2d(3))
    net[0].eps = 0.0
    x = torch.randn(256, 3, 4, 4)
    net[0].running_mean.copy_(x.mean((0, 2, 3)))
    net[0].running_var.copy_(x.var((0, 2, 3), unbiased=False))
    assert batchnorm_shift(net, [x]) < 1e-4
