"""The advice's linear probe in closed form: ridge regression on one-hot targets.

The advice needs *how well a linear head on frozen features separates the classes*, k-fold, in
milliseconds. An L-BFGS logistic regression (:mod:`tl_lightning.probe`, the literature's probe)
takes seconds to tens of seconds for that; ridge regression onto one-hot targets (predict the
arg-max) is one linear solve per fold, and its k-fold accuracy tracks the logistic probe's
(``benchmarks/advise_probe.py``, BENCHMARKS.md).

The model is ``scores = features @ weight.T + bias`` minimising
``||onehot - scores||^2 + lam * ||weight||^2`` with the bias unpenalised. ``lam`` is given relative
to the mean squared norm of the centred features (``lam = l2 * ||X - mean||_F^2 / n``), so one grid
serves features of any scale. The solve runs in the smaller of the two spaces: the ``n x n`` Gram
matrix when there are fewer samples than dimensions, else the ``d x d`` covariance.

Example::

    weight, bias = fit_ridge(train_x, train_y, num_classes=10, l2=1e-2)
    predicted = (test_x @ weight.T + bias).argmax(1)
    l2 = choose_ridge_l2(train_x, train_y, num_classes=10)   # by exact leave-one-out accuracy
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Relative strengths tried (see the module docstring); picked by exact leave-one-out accuracy.
RIDGE_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)


def _centred(features: Tensor, labels: Tensor, num_classes: int):
    x = features.detach().to(torch.float64)
    mu = x.mean(0)
    xc = x - mu
    y = F.one_hot(labels.detach().long(), num_classes).to(torch.float64)
    y_mean = y.mean(0)
    scale = xc.pow(2).sum() / x.shape[0]  # mean squared norm of a centred feature vector
    return xc, mu, y, y_mean, float(scale)


def fit_ridge(
    features: Tensor, labels: Tensor, num_classes: int, l2: float
) -> tuple[Tensor, Tensor]:
    """Closed-form ridge on one-hot targets; returns float32 ``(weight (C, D), bias (C,))``.

    ``l2`` (> 0) is relative to the mean squared norm of the centred features.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (relative ridge strength), got {l2}")
    xc, mu, y, y_mean, scale = _centred(features, labels, num_classes)
    lam = l2 * max(scale, 1e-12)
    yc = y - y_mean
    n, d = xc.shape
    if n <= d:  # dual: weight = Xc^T (Xc Xc^T + lam I)^-1 Yc
        gram = xc @ xc.T
        gram.diagonal().add_(lam)
        w = xc.T @ torch.cholesky_solve(yc, torch.linalg.cholesky(gram))
    else:  # primal: weight = (Xc^T Xc + lam I)^-1 Xc^T Yc
        cov = xc.T @ xc
        cov.diagonal().add_(lam)
        w = torch.cholesky_solve(xc.T @ yc, torch.linalg.cholesky(cov))
    bias = y_mean - mu @ w
    return w.T.float().contiguous(), bias.float()


def kfold_ridge_logits(
    features: Tensor, labels: Tensor, num_classes: int, parts: Sequence, l2: float
) -> list[Tensor]:
    """Held-out scores of :func:`fit_ridge` for each part of ``parts``, fit on all the others.

    When every training part has no more samples than dimensions (the dual solve), the folds
    share one Gram matrix ``X X^T`` of all samples, computed once: a fold's centred Gram and its
    held-out rows are read from it (``(X_R - mu)(X_R - mu)^T`` and ``X_H (X_R - mu)^T`` expand
    into blocks and row means of ``X X^T``), instead of a product of the features per fold. Else each fold is fit as is.
    """
    n, d = features.shape
    parts = [torch.as_tensor(p) for p in parts]
    rests = [torch.cat([p for j, p in enumerate(parts) if j != k]) for k in range(len(parts))]
    if any(len(r) > d for r in rests):
        out = []
        for held, rest in zip(parts, rests, strict=True):
            weight, bias = fit_ridge(features[rest], labels[rest], num_classes, l2)
            out.append(features[held].float() @ weight.T + bias)
        return out
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (relative ridge strength), got {l2}")
    x = features.detach().to(torch.float64)
    gram = x @ x.T
    onehot = F.one_hot(labels.detach().long(), num_classes).to(torch.float64)
    out = []
    for held, rest in zip(parts, rests, strict=True):
        g_rr = gram[rest][:, rest]
        g_hr = gram[held][:, rest]
        a = g_rr.mean(1)  # x_i . mu for the training rows; mu the training mean
        c = a.mean()  # mu . mu
        centred = g_rr - a[:, None] - a[None, :] + c
        scale = float(centred.diagonal().sum()) / len(rest)  # as _centred's
        centred.diagonal().add_(l2 * max(scale, 1e-12))
        y = onehot[rest]
        y_mean = y.mean(0)
        alpha = torch.cholesky_solve(y - y_mean, torch.linalg.cholesky(centred))
        # (X_H - mu)(X_R - mu)^T less its per-row constant X_H . mu: a constant row shift
        # meets 1^T alpha = 0 (alpha = (K + lam I)^-1 Yc, K 1 = 0, Yc centred)
        cross = g_hr - a[None, :]
        out.append((cross @ alpha + y_mean).float())
    return out


def ridge_loo_accuracy(
    features: Tensor, labels: Tensor, num_classes: int, grid: Sequence[float] = RIDGE_GRID
) -> list[tuple[float, float]]:
    """Exact leave-one-out accuracy of :func:`fit_ridge` for every ``l2`` in ``grid``.

    One eigendecomposition serves the whole grid: with ``H`` the hat matrix of the fit (intercept
    included), the prediction for sample ``i`` from a fit without it is
    ``y_i - r_i / (1 - H_ii)``, ``r`` the residual of the fit on all samples.
    """
    xc, _, y, y_mean, scale = _centred(features, labels, num_classes)
    n, d = xc.shape
    if n <= d:
        s, q = torch.linalg.eigh(xc @ xc.T)
    else:  # the left singular vectors from the d x d problem: q = Xc V / sqrt(s)
        s, v = torch.linalg.eigh(xc.T @ xc)
        keep = s > s.max() * 1e-12
        s, q = s[keep], xc @ v[:, keep] / s[keep].sqrt()
    s = s.clamp(min=0)
    proj = q.T @ (y - y_mean)
    q2 = q.pow(2)
    out = []
    for l2 in grid:
        shrink = s / (s + l2 * max(scale, 1e-12))
        fitted = y_mean + q @ (shrink[:, None] * proj)
        h = q2 @ shrink + 1.0 / n  # the intercept's share of the hat matrix is 1/n
        loo = y - (y - fitted) / (1.0 - h)[:, None]
        out.append((float(l2), float((loo.argmax(1) == labels).double().mean())))
    return out


def choose_ridge_l2(
    features: Tensor, labels: Tensor, num_classes: int, grid: Sequence[float] = RIDGE_GRID
) -> float:
    """The ``l2`` in ``grid`` with the best leave-one-out accuracy; ties go to the stronger one."""
    if not grid:
        raise ValueError("grid is empty; pass at least one relative strength, e.g. [1e-2]")
    curve = sorted(ridge_loo_accuracy(features, labels, num_classes, grid), reverse=True)
    best = curve[0]
    for l2, acc in curve[1:]:
        if acc > best[1]:
            best = (l2, acc)
    return best[0]
