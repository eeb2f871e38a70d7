"""Optimizers over named, discriminative param groups and schedulers that know the run's length."""

from __future__ import annotations

import functools
import inspect
import logging
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

log = logging.getLogger(__name__)


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


class _LengthOfThisRun:
    """Mixin for schedules that are a function of ``total_steps``: a restored state keeps this run's.

    A checkpoint restores the step count, not the length the run now has (``--trainer.max_epochs``
    raised on resume): the schedule continues on the curve of the new length from the step
    reached, and this step's LR (and cycled momentum) are set from it at once.
    """

    total_steps: int

    def load_state_dict(self, state_dict: dict) -> None:
        total, kept = self.total_steps, self._length_state()
        super().load_state_dict(state_dict)
        if self.total_steps == total:
            return
        log.info("%s: the checkpoint's schedule had %d steps, this run's has %d; continuing on the new curve",
                 type(self).__name__, self.total_steps, total)
        self.total_steps = total
        self.__dict__.update(kept)
        with warnings.catch_warnings():  # get_lr outside step(): wanted here
            warnings.simplefilter("ignore")
            lrs = self.get_lr()  # OneCycleLR also sets this step's momentum
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def _length_state(self) -> dict:
        return {}


class OneCycleLR(_LengthOfThisRun, torch.optim.lr_scheduler.OneCycleLR):
    """OneCycleLR whose peak defaults to each group's own LR, keeping discriminative LRs.

    torch's version needs ``max_lr`` and would give every group the same peak.

    Extending a run (``--ckpt_path last --trainer.max_epochs <more>``) keeps the cycle this run
    was built for (``_LengthOfThisRun``): the remaining steps follow the longer cycle from the
    step reached (the LR jumps to that point of the new curve) instead of stepping past the old
    end (torch's ``Tried to step N times``).

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> short = OneCycleLR(opt, total_steps=10); saved = short.state_dict()
        >>> longer = OneCycleLR(opt, total_steps=20); longer.load_state_dict(saved)
        >>> longer.total_steps
        20
    """

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, max_lr: float | list[float] | None = None, pct_start: float = 0.25, **kwargs):
        if max_lr is None:
            max_lr = [g["lr"] for g in optimizer.param_groups]
        if total_steps and total_steps >= 4:  # short runs (smoke tests): each phase gets a step
            pct_start = min(0.5, max(pct_start, 2.0 / total_steps))
        # (under 4 steps torch's own phases are left as they are: forcing 0.5 on 2 steps would
        # end the warm-up at step 0, a zero-length phase that torch divides by)
        super().__init__(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start, **kwargs)

    def _length_state(self) -> dict:
        return {"_schedule_phases": self._schedule_phases}  # phase end steps follow the length


class WarmupCosine(_LengthOfThisRun, LambdaLR):
    """Linear warm-up for ``warmup_fraction`` of the run, then cosine decay to ``min_ratio`` x LR.

    A run extended with more epochs continues on the curve of its new length from the step
    reached (see ``_LengthOfThisRun``).
    """

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None, warmup_fraction: float = 0.05, min_ratio: float = 0.0):
        if total_steps is None:
            raise ValueError("WarmupCosine needs total_steps (set automatically when used from a tl-lightning module)")
        warmup = max(1, int(warmup_fraction * total_steps))
        self.total_steps = total_steps  # saved in state_dict; the curve (a closure) is not

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
