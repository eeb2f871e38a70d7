"""Optimizers over named, discriminative param groups and schedulers that know the run's length."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau


def make_optimizer(factory: Callable, groups: Sequence[dict]) -> Optimizer:
    """Build ``factory(groups)``; a group's ``lr_scale`` multiplies the optimizer's base ``lr``.

    Groups carry a ``name`` (shown by LearningRateMonitor) and either an explicit ``lr`` or an
    ``lr_scale`` relative to the base LR taken from the optimizer's own config.
    """
    opt = factory([dict(g) for g in groups])
    base = opt.defaults["lr"]
    for g in opt.param_groups:
        if "lr_scale" in g:
            g["lr"] = base * g["lr_scale"]
    return opt


def _target(factory: Callable) -> tuple[Callable, dict]:
    """The class behind a jsonargparse/functools partial, and the keywords already bound."""
    if isinstance(factory, functools.partial):
        cls = next((a for a in factory.args if inspect.isclass(a)), factory.func)
        return cls, dict(factory.keywords)
    return factory, {}


def wants_total_steps(factory: Callable) -> bool:
    cls, bound = _target(factory)
    if "total_steps" in bound:
        return bound["total_steps"] is None
    try:
        return "total_steps" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def make_scheduler(factory: Callable, optimizer: Optimizer, total_steps: int, monitor: str = "val/loss") -> dict:
    """Lightning's ``lr_scheduler`` dict: per-step with total steps injected, or per-epoch.

    A scheduler that takes ``total_steps`` (OneCycleLR, :class:`WarmupCosine`) gets the
    trainer's ``estimated_stepping_batches`` and steps every batch; ReduceLROnPlateau monitors
    ``monitor``; anything else steps once per epoch.
    """
    if wants_total_steps(factory):
        return {"scheduler": factory(optimizer, total_steps=int(total_steps)), "interval": "step"}
    scheduler = factory(optimizer)
    config = {"scheduler": scheduler, "interval": "epoch"}
    if isinstance(scheduler, ReduceLROnPlateau):
        config["monitor"] = monitor
    return config


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """OneCycleLR whose peak defaults to each group's own LR, keeping discriminative LRs.

    torch's version needs ``max_lr`` and would give every group the same peak.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, max_lr: float | list[float] | None = None, pct_start: float = 0.25, **kwargs):
        if max_lr is None:
            max_lr = [g["lr"] for g in optimizer.param_groups]
        if total_steps:  # very short runs (smoke tests): each phase needs at least one step
            pct_start = min(0.5, max(pct_start, 2.0 / total_steps))
        super().__init__(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, **kwargs)


class WarmupCosine(LambdaLR):
    """Linear warm-up for ``warmup_fraction`` of the run, then cosine decay to ``min_ratio`` x LR."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, warmup_fraction: float = 0.05, min_ratio: float = 0.0):
        if total_steps is None:
            raise ValueError("WarmupCosine needs total_steps (set automatically when used from a tl-lightning module)")
        warmup = max(1, int(warmup_fraction * total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
