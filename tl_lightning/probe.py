"""The linear probe as the literature fits it: L2-regularised logistic regression by full-batch L-BFGS.

Kornblith et al. (2019) and CLIP's linear-probe evaluation fit a multinomial logistic regression on
frozen features with L-BFGS and pick the regularisation strength on validation data; this module does
the same in torch, so it runs on whatever device the features are on (CPU or GPU).

The objective is ``mean cross-entropy + l2 / 2 * ||W||^2`` with the bias unregularised. Scikit-learn's
``LogisticRegression(C=...)`` minimises ``C * sum cross-entropy + 1/2 ||W||^2``; dividing by ``C * n``
gives ours, so ``l2 = 1 / (n * C)`` and ``C = 1 / (n * l2)`` for ``n`` training samples.

Example::

    result = sweep_logistic_regression(train_x, train_y, val_x, val_y, num_classes=10)
    logits = test_x @ result.weight.T + result.bias
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tl_lightning.errors import DataError

# strengths tried by default: 1e-6 .. 1e0, two points a decade (13 fits, warm-started strongest first)
DEFAULT_GRID: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-12, 1))


@dataclass
class ProbeResult:
    """The head chosen by a sweep: ``logits = features @ weight.T + bias``."""

    weight: Tensor  # (C, D)
    bias: Tensor  # (C,)
    l2: float  # chosen strength
    val_acc: float
    curve: list[tuple[float, float]] = field(default_factory=list)  # (l2, val_acc) per grid point


def _check(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.ndim != 2:
        raise DataError(f"features must be (N, D), got shape {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise DataError(
            f"labels must be (N,) = ({features.shape[0]},) to match the features, got {tuple(labels.shape)}"
        )
    if features.shape[0] == 0:
        raise DataError("no features to fit the probe on; is the training split empty?")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"got [{int(labels.min())}, {int(labels.max())}]"
        )


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    l2: float,
    max_iter: int = 1000,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Minimise ``mean CE(features @ W.T + b, labels) + l2/2 ||W||^2`` by full-batch L-BFGS.

    ``weight`` (C, D) and ``bias`` (C,) warm-start the fit. It stops when every gradient entry is
    below ``tol`` in absolute value: scikit-learn's ``tol`` (and its default) on the same, mean-scaled
    objective. Returns float32 ``(weight, bias)`` on the features' device: the same minimiser as scikit-learn's ``LogisticRegression(solver="lbfgs", C=1/(n*l2))``.

    Example::

        w, b = fit_logistic_regression(x, y, num_classes=3, l2=1e-3)
        predictions = (x @ w.T + b).argmax(1)
    """
    _check(features, labels, num_classes)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    # The two products with the features run in their own precision (float32 from a cache: half the
    # time of float64); logits, loss, gradients and the L-BFGS state are float64, because a float32
    # loss stops resolving changes while the gradient is still ~1e-4 and L-BFGS halts short of the
    # optimum. Gradients are written by hand: no autograd graph, and no inference-tensor trouble.
    # Autocast off: called inside a bf16/fp16 autocast region (a Trainer's forward, a user's
    # notebook) the products would run in 8 bits of mantissa and stop far from the optimum.
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        torch.autocast(features.device.type, enabled=False),
    ):
        gemm = torch.float64 if features.dtype == torch.float64 else torch.float32
        x64 = features.detach().to(torch.float64)
        # centring is an exact reparameterisation (the bias is unregularised: b' = b + W mu) that
        # makes the problem far better conditioned for L-BFGS
        mu = x64.mean(0)
        x = (x64 - mu).to(gemm)
        del x64
        y = labels.detach().to(x.device, torch.long)
        n, d = x.shape
        rows = torch.arange(n, device=x.device)
        w = (
            torch.zeros(num_classes, d, dtype=torch.float64, device=x.device)
            if weight is None
            else weight
        )
        b = torch.zeros(num_classes, dtype=torch.float64, device=x.device) if bias is None else bias
        w = w.detach().to(x.device, torch.float64, copy=True)
        b = b.detach().to(x.device, torch.float64) + w @ mu
        optimizer = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=max_iter,
            max_eval=max_iter * 5 // 4,
            tolerance_grad=tol,
            tolerance_change=1e-10,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            log_p = torch.log_softmax((x @ w.to(gemm).T).double() + b, dim=1)
            loss = -log_p[rows, y].mean() + 0.5 * l2 * w.pow(2).sum()
            residual = log_p.exp_()  # d(mean CE)/d(logits) = (softmax - onehot) / n
            residual[rows, y] -= 1.0
            residual /= n
            w.grad = (residual.to(gemm).T @ x).double() + l2 * w
            b.grad = residual.sum(0)
            return loss

        optimizer.step(closure)
        return w.float(), (b - w @ mu).float()


def _accuracy(features: Tensor, labels: Tensor, weight: Tensor, bias: Tensor) -> float:
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        logits = features.to(weight.device, weight.dtype) @ weight.T + bias
        return (logits.argmax(1) == labels.to(weight.device)).float().mean().item()


def sweep_logistic_regression(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    num_classes: int,
    grid: Sequence[float] | None = None,
    max_iter: int = 1000,
    tol: float = 1e-4,
) -> ProbeResult:
    """Fit one probe per ``l2`` in ``grid`` and keep the best on the validation split.

    Fits run from the strongest ``l2`` to the weakest, each warm-started from the previous solution
    (a regularisation path: every next problem starts close to its answer). Ties in validation
    accuracy go to the stronger regularisation. Only validation data choose ``l2``; pass test data
    nowhere here.

    Example::

        result = sweep_logistic_regression(xtr, ytr, xval, yval, num_classes=10, grid=[1e-4, 1e-2])
        result.l2, result.val_acc, result.curve
    """
    _check(val_features, val_labels, num_classes)
    grid = sorted({float(g) for g in (DEFAULT_GRID if grid is None else grid)}, reverse=True)
    if not grid:
        raise ValueError("grid is empty; pass at least one l2 strength, e.g. grid=[1e-4]")
    weight = bias = None
    best: ProbeResult | None = None
    curve: list[tuple[float, float]] = []
    for l2 in grid:
        weight, bias = fit_logistic_regression(
            train_features,
            train_labels,
            num_classes,
            l2,
            max_iter=max_iter,
            weight=weight,
            bias=bias,
            tol=tol,
        )
        acc = _accuracy(val_features, val_labels, weight, bias)
        curve.append((l2, acc))
        if best is None or acc > best.val_acc:
            best = ProbeResult(weight=weight, bias=bias, l2=l2, val_acc=acc)
    assert best is not None
    best.curve = curve
    return best
