"""The closed-form ridge probe against independent fits (numpy least squares, explicit loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_lightning.advisor import distance
from tl_lightning.advisor.distance import fold_indices, kfold_probe_accuracy
from tl_lightning.advisor.ridge import (
    choose_ridge_l2,
    fit_ridge,
    kfold_ridge_logits,
    ridge_loo_accuracy,
)


def _data(n: int, d: int, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(n // classes + 1)[:n]
    x = (
        torch.randn(n, d, generator=g) + 1.5 * torch.eye(classes, d)[y] + 0.7
    )  # offset: bias matters
    return x, y


def _lstsq_ridge(x: np.ndarray, y: np.ndarray, classes: int, lam: float):
    """min ||onehot - x w - 1 b||^2 + lam ||w||^2 as one stacked least-squares problem."""
    n, d = x.shape
    a = np.block([[x, np.ones((n, 1))], [np.sqrt(lam) * np.eye(d), np.zeros((d, 1))]])
    t = np.vstack([np.eye(classes)[y], np.zeros((d, classes))])
    sol = np.linalg.lstsq(a, t, rcond=None)[0]
    return sol[:d].T, sol[d]


def _absolute(x: np.ndarray, l2: float) -> float:
    return l2 * ((x - x.mean(0)) ** 2).sum() / len(x)


@pytest.mark.parametrize("n,d", [(12, 30), (40, 6)])  # dual (n <= d) and primal (n > d) solves
def test_fit_ridge_equals_stacked_least_squares(n, d):
    x, y = _data(n, d)
    weight, bias = fit_ridge(x, y, 3, l2=0.05)
    xn = x.double().numpy()
    w_ref, b_ref = _lstsq_ridge(xn, y.numpy(), 3, _absolute(xn, 0.05))
    np.testing.assert_allclose(weight.numpy(), w_ref, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), b_ref, atol=1e-5)


def test_fit_ridge_separates_separable_classes_and_rejects_a_zero_strength():
    x, y = _data(30, 8)
    x = x + 20.0 * torch.eye(3, 8)[y]
    weight, bias = fit_ridge(x, y, 3, l2=1e-2)
    assert torch.equal((x @ weight.T + bias).argmax(1), y)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        fit_ridge(x, y, 3, l2=0.0)


@pytest.mark.parametrize("n,d", [(15, 20), (24, 5)])
def test_leave_one_out_equals_refitting_without_each_sample(n, d):
    x, y = _data(n, d, seed=3)
    xn, yn = x.double().numpy(), y.numpy()
    grid = (1e-3, 0.1, 1.0)
    got = ridge_loo_accuracy(x, y, 3, grid)
    for l2, acc in got:
        lam = _absolute(xn, l2)  # the strength of the fit on all samples, held fixed
        correct = 0
        for i in range(n):
            keep = np.arange(n) != i
            w, b = _lstsq_ridge(xn[keep], yn[keep], 3, lam)
            correct += int(np.argmax(xn[i] @ w.T + b) == yn[i])
        assert acc == pytest.approx(correct / n)
    assert [l2 for l2, _ in got] == list(grid)


def test_choose_ridge_l2_takes_the_best_and_breaks_ties_towards_the_stronger(monkeypatch):
    from tl_lightning.advisor import ridge

    curve = [(1e-3, 0.7), (1e-2, 0.9), (1e-1, 0.9), (1.0, 0.8)]
    monkeypatch.setattr(ridge, "ridge_loo_accuracy", lambda *a, **k: curve)
    assert choose_ridge_l2(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2) == 1e-1
    curve = [(1e-3, 0.95), (1e-2, 0.9), (1e-1, 0.9), (1.0, 0.8)]
    assert choose_ridge_l2(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2) == 1e-3


def test_folds_partition_the_samples_and_keep_class_proportions():
    y = np.array([0] * 20 + [1] * 10 + [2] * 5)
    parts = fold_indices(y, 5)
    everything = np.concatenate(parts)
    assert sorted(everything.tolist()) == list(range(len(y)))  # disjoint and complete
    for part in parts:
        assert np.bincount(y[part], minlength=3).tolist() == [4, 2, 1]


# primal (every training part has more samples than dimensions: one fit per fold) and dual (the
# folds share one Gram matrix of all samples)
@pytest.mark.parametrize("n,d", [(45, 10), (45, 40)])
def test_kfold_probe_equals_an_explicit_loop_of_held_out_fits(monkeypatch, n, d):
    x, y = _data(n, d, seed=5)
    monkeypatch.setattr(distance, "choose_ridge_l2", lambda *a, **k: 0.2)
    xn, yn = x.double().numpy(), y.numpy()
    correct = 0
    for held in fold_indices(yn, 3):
        rest = np.setdiff1d(np.arange(len(yn)), held)
        w, b = _lstsq_ridge(xn[rest], yn[rest], 3, _absolute(xn[rest], 0.2))
        correct += int((np.argmax(xn[held] @ w.T + b, 1) == yn[held]).sum())
    assert kfold_probe_accuracy(x, y, 3, folds=3) == pytest.approx(correct / len(yn))


@pytest.mark.parametrize("n,d", [(45, 10), (45, 40)])
def test_kfold_held_out_scores_equal_independent_fits(n, d):
    x, y = _data(n, d, seed=6)
    parts = fold_indices(y.numpy(), 3)
    xn, yn = x.double().numpy(), y.numpy()
    got = kfold_ridge_logits(x, y, 3, parts, 0.3)
    for held, scores in zip(parts, got, strict=True):
        rest = np.setdiff1d(np.arange(n), held)
        w, b = _lstsq_ridge(xn[rest], yn[rest], 3, _absolute(xn[rest], 0.3))
        np.testing.assert_allclose(scores.numpy(), xn[held] @ w.T + b, rtol=1e-4, atol=1e-5)


def test_the_strength_is_picked_once_on_the_first_training_part_only(monkeypatch):
    x, y = _data(30, 6, seed=7)
    seen = []

    def spy(features, labels, num_classes):
        seen.append(features.clone())
        return 0.1

    monkeypatch.setattr(distance, "choose_ridge_l2", spy)
    kfold_probe_accuracy(x, y, 3, folds=3)
    parts = fold_indices(y.numpy(), 3)
    first_rest = np.sort(np.concatenate(parts[1:]))  # every fold but the first held-out one
    assert len(seen) == 1
    # the rows it saw are exactly the first fold's training rows (in any order)
    got = {tuple(r) for r in seen[0].tolist()}
    assert got == {tuple(r) for r in x[first_rest].tolist()}
