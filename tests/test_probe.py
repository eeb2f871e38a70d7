"""The L-BFGS linear probe against scikit-learn and against its own optimality conditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from tl_lightning.errors import DataError
from tl_lightning.probe import fit_logistic_regression, sweep_logistic_regression

TIGHT = 1e-8  # the default tol (scikit-learn's 1e-4) stops short of these tests' tolerances


def _blobs(n_per_class=20, dim=5, num_classes=3, spread=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3 + 2.0  # off-origin: the bias matters
    x = torch.cat(
        [
            centres[c] + spread * torch.randn(n_per_class, dim, generator=g)
            for c in range(num_classes)
        ]
    )
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return x.double(), y  # float64: products in float64 too, so tight tolerances are reachable


def _sklearn(x, y, l2):
    n = x.shape[0]
    clf = LogisticRegression(solver="lbfgs", C=1.0 / (n * l2), tol=1e-10, max_iter=10_000)
    return clf.fit(x.double().numpy(), y.numpy())


def _objective_gradient(x, y, w, b, l2):
    """d/dW, d/db of mean CE + l2/2 ||W||^2, written out by hand in float64: (P - Y)^T X / n + l2 W."""
    x, w, b = x.double(), w.double(), b.double()
    logits = x @ w.T + b
    p = torch.exp(logits - logits.logsumexp(1, keepdim=True))
    p[torch.arange(len(y)), y] -= 1.0
    return p.T @ x / len(y) + l2 * w, p.mean(0)


def test_separable_case_predicts_like_sklearn():
    x, y = _blobs()
    l2 = 1e-3
    w, b = fit_logistic_regression(x, y, num_classes=3, l2=l2, tol=TIGHT)
    ref = _sklearn(x, y, l2)
    # points everywhere, not just the training blobs (seeded: near-boundary points are a tolerance question)
    probe = torch.randn(200, 5, generator=torch.Generator().manual_seed(7)) * 4 + 2.0
    ours = (probe @ w.T + b).argmax(1).numpy()
    np.testing.assert_array_equal(ours, ref.predict(probe.double().numpy()))
    np.testing.assert_array_equal((x.float() @ w.T + b).argmax(1).numpy(), y.numpy())


@pytest.mark.parametrize("l2", [1e-1, 1e-2])
def test_same_minimiser_as_sklearn_with_c_equal_one_over_n_l2(l2):
    x, y = _blobs(spread=3.0, seed=1)  # overlapping classes: a unique, well-defined optimum
    w, b = fit_logistic_regression(x, y, num_classes=3, l2=l2, tol=TIGHT)
    ref = _sklearn(x, y, l2)
    # multinomial logits are defined up to a shift shared by the classes; compare centred biases
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(
        (b - b.mean()).numpy(), ref.intercept_ - ref.intercept_.mean(), atol=2e-4
    )


def test_gradient_is_zero_at_the_solution():
    x, y = _blobs(spread=2.0, seed=2)
    l2 = 1e-2
    w, b = fit_logistic_regression(x, y, num_classes=3, l2=l2, tol=TIGHT)
    gw, gb = _objective_gradient(x, y, w, b, l2)
    assert gw.abs().max() < 1e-5 and gb.abs().max() < 1e-5
    # and not trivially: the starting point (zeros) is far from stationary
    gw0, _ = _objective_gradient(x, y, torch.zeros_like(w), torch.zeros_like(b), l2)
    assert gw0.abs().max() > 1e-1


def test_warm_start_reaches_the_same_solution():
    x, y = _blobs(spread=2.0, seed=3)
    cold_w, cold_b = fit_logistic_regression(x, y, 3, l2=1e-2, tol=TIGHT)
    g = torch.Generator().manual_seed(0)
    far_w, far_b = 3 * torch.randn(3, 5, generator=g), 3 * torch.randn(3, generator=g)
    warm_w, warm_b = fit_logistic_regression(x, y, 3, l2=1e-2, weight=far_w, bias=far_b, tol=TIGHT)
    # the smallest curvature is ~l2, so a float32 gradient of ~1e-6 leaves the weights ~1e-4 apart
    torch.testing.assert_close(warm_w, cold_w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(warm_b - warm_b.mean(), cold_b - cold_b.mean(), atol=1e-3, rtol=1e-3)
    assert (warm_w - far_w).abs().max() > 1.0  # it did move from the far start


def test_sweep_picks_the_best_validation_strength_and_records_the_curve():
    x, y = _blobs(n_per_class=30, spread=3.0, seed=4)
    xv, yv = _blobs(n_per_class=30, spread=3.0, seed=5)
    grid = [1e-4, 1e-2, 1.0, 10.0]
    result = sweep_logistic_regression(x, y, xv, yv, num_classes=3, grid=grid)
    # independent: fit each strength cold with scikit-learn and score on validation
    sk_acc = {
        l2: (_sklearn(x, y, l2).predict(xv.double().numpy()) == yv.numpy()).mean() for l2 in grid
    }
    curve = dict(result.curve)
    assert sorted(curve) == sorted(grid)
    for l2 in grid:
        assert curve[l2] == pytest.approx(sk_acc[l2], abs=1.5 / len(yv))
    assert result.val_acc == max(curve.values())
    assert curve[result.l2] == result.val_acc
    # ties go to the stronger regularisation
    assert result.l2 == max(l2 for l2, acc in result.curve if acc == result.val_acc)
    chosen_acc = (
        ((xv.float() @ result.weight.T + result.bias).argmax(1) == yv).float().mean().item()
    )
    assert chosen_acc == pytest.approx(result.val_acc)


def test_inference_mode_features_are_accepted():
    x, y = _blobs()
    with torch.inference_mode():
        x_inf = x.clone()
        w, b = fit_logistic_regression(x_inf, y, 3, l2=1e-3)
    w2, b2 = fit_logistic_regression(x, y, 3, l2=1e-3)
    torch.testing.assert_close(w, w2)


def test_bad_labels_name_the_range():
    x, y = _blobs()
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        fit_logistic_regression(x, y, num_classes=2, l2=1e-3)


def test_warm_start_from_the_solution_stays_there():
    # the warm start is taken in the caller's (uncentred) coordinates: one step from the answer
    # must not move it
    x, y = _blobs(spread=2.0, seed=3)
    w, b = fit_logistic_regression(x, y, 3, l2=1e-2, tol=TIGHT)
    again_w, again_b = fit_logistic_regression(
        x, y, 3, l2=1e-2, max_iter=1, weight=w, bias=b, tol=TIGHT
    )
    torch.testing.assert_close(again_w, w, atol=1e-4, rtol=0)
    torch.testing.assert_close(again_b, b, atol=1e-4, rtol=0)


def test_an_autocast_region_does_not_change_the_fit_or_the_choice():
    # a Trainer's bf16 forward or a user's notebook may call the probe inside autocast, where a
    # float32 matmul would run in bf16; the fit must be the float32 one all the same
    x_all, y_all = _blobs(n_per_class=60, spread=2.0, seed=2)
    x, y, xv, yv = x_all[::2], y_all[::2], x_all[1::2], y_all[1::2]
    # far from the origin, where bf16's 8-bit mantissa rounds features to steps of 2-4: scoring
    # validation there under autocast would garble the logits (fitting centres, so it would not)
    x, xv = x.float() + 500, xv.float() + 500
    grid = [1e-1, 1e-3]
    plain = sweep_logistic_regression(x, y, xv, yv, num_classes=3, grid=grid, tol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sweep_logistic_regression(x, y, xv, yv, num_classes=3, grid=grid, tol=1e-6)
    torch.testing.assert_close(auto.weight, plain.weight)
    torch.testing.assert_close(auto.bias, plain.bias)
    assert auto.curve == plain.curve and auto.l2 == plain.l2
    # independent: the chosen head scored by hand in float64
    manual = (xv.double() @ plain.weight.double().T + plain.bias.double()).argmax(1) == yv
    assert plain.val_acc == pytest.approx(manual.double().mean().item()) and plain.val_acc > 0.8
    assert auto.weight.dtype == torch.float32
