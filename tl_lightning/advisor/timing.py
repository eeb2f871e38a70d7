"""Seconds per epoch of each strategy on this machine, measured on a few real training batches."""

from __future__ import annotations

import copy
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tl_lightning.advisor.rule import last_groups_count


@dataclass
class Timing:
    """Measured seconds per batch, and per epoch for each strategy.

    ``forward`` is a frozen forward pass (caching features, validating, a frozen epoch),
    ``last``/``full`` a training step with the last groups / every group trainable.
    """

    forward: float
    last: float
    full: float
    train_steps: int
    val_steps: int
    load: float = 0.0  # seconds to fetch one batch from the datamodule's loader

    def epoch_seconds(self, strategy: str) -> float:
        """One epoch's seconds (train + validation). Feature extraction: the first, caching, epoch;
        later ones train a head on cached features and cost next to nothing. Gradual unfreezing:
        an unfrozen epoch (its frozen first epoch costs a feature-extraction epoch)."""
        val = self.val_steps * (self.load + self.forward)
        per_step = {
            "feature_extraction": self.forward,
            "last_groups": self.last,
            "full_finetune": self.full,
            "gradual_unfreezing": self.full,
        }[strategy]
        return self.train_steps * (self.load + per_step) + val


def _autocast(precision: str, device: torch.device):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Two timed steps this close (relative) already agree: their mean is the estimate, and the
# remaining batches are not run (a full fine-tuning step is the advice's costliest measurement).
STABLE = 0.1


def _median_step(step, batches: list, device: torch.device) -> float:
    """Median seconds of ``step`` over ``batches`` after one warm-up step, stopping early once two
    timed steps agree within ``STABLE`` (then their mean)."""
    times = []
    for x, y in batches:
        _sync(device)
        start = time.perf_counter()
        step(x, y)
        _sync(device)
        times.append(time.perf_counter() - start)
        timed = times[1:]  # the first step warms up kernels and allocators
        if len(timed) == 2 and abs(timed[0] - timed[1]) <= STABLE * min(timed):
            break
    return statistics.median(times[1:] or times)


def measure_timing(
    backbone,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    train_steps: int,
    val_steps: int,
    precision: str = "32-true",
    device: str | torch.device = "cpu",
    load: float = 0.0,
) -> Timing:
    """Time a frozen forward and a training step (last groups, all groups) on ``batches``.

    ``batches`` are real training batches (2 or more: the first only warms up; the rest are timed
    until two steps agree within ``STABLE``). The backbone is
    copied, so the caller's weights and frozen state are untouched. ``load`` is the measured
    seconds to fetch one batch (decoding files), added to every step.

    Example:
        >>> t = measure_timing(bb, [next(it) for _ in range(3)], 10, train_steps=17, val_steps=6)  # doctest: +SKIP
        >>> t.epoch_seconds("full_finetune")  # doctest: +SKIP
    """
    device = torch.device(device)
    net = copy.deepcopy(backbone).to(device).to(memory_format=torch.channels_last)
    head = nn.Linear(net.feature_dim, num_classes).to(device)
    batches = [
        (x.to(device).contiguous(memory_format=torch.channels_last), y.to(device))
        for x, y in batches
    ]
    groups = net.group_names()
    n_last = last_groups_count(len(groups))

    def forward(x, y):
        with torch.no_grad(), _autocast(precision, device):
            head(net(x))

    def trainer_step(optimizer):
        def step(x, y):
            with _autocast(precision, device):
                loss = F.cross_entropy(head(net(x)).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    net.eval()
    t_forward = _median_step(forward, batches, device)
    net.train()
    net.unfreeze()
    net.freeze(groups[: len(groups) - n_last], bn="eval")
    params = [p for p in [*net.parameters(), *head.parameters()] if p.requires_grad]
    t_last = _median_step(trainer_step(torch.optim.AdamW(params)), batches, device)
    net.unfreeze()
    params = [*net.parameters(), *head.parameters()]
    t_full = _median_step(trainer_step(torch.optim.AdamW(params)), batches, device)
    return Timing(t_forward, t_last, t_full, train_steps, val_steps, load)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass over ``n`` samples (the datamodule drops the last train batch when n > batch)."""
    return n // batch_size if drop_last and n > batch_size else math.ceil(n / batch_size)
