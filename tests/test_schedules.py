"""LR schedules step by step against their formulas: WarmupCosine, OneCycleLR's per-group peaks, lr_scale groups."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tl_lightning.optim import OneCycleLR, WarmupCosine, make_optimizer, make_scheduler


def _optimizer(lrs=(1.0, 0.1)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], lr=lrs[0])


def _lrs_over(scheduler, optimizer, steps):
    seen = []
    for _ in range(steps):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


@pytest.mark.parametrize("total,fraction,min_ratio", [(40, 0.25, 0.0), (20, 0.1, 0.1)])
def test_warmup_cosine_ramps_linearly_then_follows_the_cosine(total, fraction, min_ratio):
    optimizer = _optimizer()
    scheduler = WarmupCosine(
        optimizer, total_steps=total, warmup_fraction=fraction, min_ratio=min_ratio
    )
    seen = _lrs_over(scheduler, optimizer, total)
    warmup = int(fraction * total)
    for step, (lr0, lr1) in enumerate(seen):
        if step < warmup:  # linear, reaching the full LR at the last warm-up step
            factor = (step + 1) / warmup
        else:
            t = (step - warmup) / (total - warmup)
            factor = min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * t)) / 2
        assert lr0 == pytest.approx(1.0 * factor), step
        assert lr1 == pytest.approx(0.1 * factor), step  # every group, in proportion
    assert seen[0][0] == pytest.approx(1 / warmup) and seen[0][0] <= 0.5
    assert max(s[0] for s in seen) == pytest.approx(1.0)


def test_warmup_cosine_ends_at_min_ratio():
    optimizer = _optimizer()
    scheduler = WarmupCosine(optimizer, total_steps=10, warmup_fraction=0.2, min_ratio=0.05)
    _lrs_over(scheduler, optimizer, 10)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_one_cycle_peaks_at_each_groups_own_lr():
    optimizer = _optimizer((1e-2, 1e-4))
    total = 20
    scheduler = OneCycleLR(optimizer, total_steps=total)
    seen = _lrs_over(scheduler, optimizer, total)
    peaks = [max(s[i] for s in seen) for i in range(2)]
    assert peaks == pytest.approx([1e-2, 1e-4])  # torch's own would give both the same max_lr
    # torch's defaults: starts at max_lr / 25
    assert seen[0] == pytest.approx([1e-2 / 25, 1e-4 / 25])


@pytest.mark.parametrize("total", range(1, 11))
def test_one_cycle_runs_any_short_length_and_peaks_once_there_is_room(total):
    # a 1-10 step run (a smoke test, a tiny split) steps to its end like any other
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = OneCycleLR(opt, total_steps=total)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(total):
        opt.step()
        schedule.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert all(math.isfinite(lr) for lr in lrs)
    if total >= 4:  # room for both phases: up to the peak lr, then down below the start
        assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs.index(max(lrs)) > 0
        assert lrs[total - 1] < lrs[0]


def test_make_optimizer_scales_groups_from_the_optimizers_own_lr():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    groups = [
        {"name": "head", "params": [a], "lr_scale": 1.0},
        {"name": "backbone", "params": [b], "lr_scale": 0.1},
        {"name": "fixed", "params": [c], "lr": 0.5},
    ]
    opt = make_optimizer(functools.partial(torch.optim.SGD, lr=0.03), groups)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.03, 0.003, 0.5])
    assert [g["name"] for g in opt.param_groups] == ["head", "backbone", "fixed"]


def test_make_scheduler_gives_step_schedulers_the_run_length():
    optimizer = _optimizer()
    config = make_scheduler(functools.partial(WarmupCosine, warmup_fraction=0.5), optimizer, 8)
    assert config["interval"] == "step"
    # total 8, warm-up 4: the LR rises for 4 steps, then falls back to 0 at step 8
    seen = _lrs_over(config["scheduler"], optimizer, 8)
    assert [s[0] for s in seen[:4]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert seen[-1][0] == pytest.approx((1 + math.cos(math.pi * 3 / 4)) / 2)
    epoch = make_scheduler(
        functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1), optimizer, 8
    )
    assert epoch["interval"] == "epoch"
