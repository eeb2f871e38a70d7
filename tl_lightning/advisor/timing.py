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

    ``forward`` is a frozen forward pass at the feature-extraction precision (caching features: a
    feature-extraction epoch), ``val_forward`` one at the training precision (a fine-tuning run's
    validation; ``None``: the same as ``forward``), ``last``/``full`` a training step with the
    last groups / every group trainable.
    """

    forward: float
    last: float
    full: float
    train_steps: int
    val_steps: int
    load: float = 0.0  # seconds to fetch one batch from the datamodule's loader
    val_forward: float | None = None

    def epoch_seconds(self, strategy: str) -> float:
        """One epoch's seconds (train + validation). Feature extraction: the first, caching, epoch;
        later ones train a head on cached features and cost next to nothing. Gradual unfreezing:
        an unfrozen epoch (its frozen first epoch costs a feature-extraction epoch)."""
        if strategy == "feature_extraction":
            per_step, val_step = self.forward, self.forward
        else:
            per_step = {
                "last_groups": self.last,
                "full_finetune": self.full,
                "gradual_unfreezing": self.full,
            }[strategy]
            val_step = self.forward if self.val_forward is None else self.val_forward
        return self.train_steps * (self.load + per_step) + self.val_steps * (self.load + val_step)


def _autocast(precision: str, device: torch.device):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def wait_for_device(device: torch.device) -> None:
    """Block until ``device`` has finished its queued work (a GPU runs asynchronously), so a
    clock read after it times the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Two timed steps this close (relative) already agree: their mean is the estimate, and the
# remaining batches are not run (a full fine-tuning step is the advice's costliest measurement).
STABLE = 0.1


def _median_step(step, batches: list, device: torch.device, warm_up: int = 1) -> float:
    """Median seconds of ``step`` over ``batches`` after ``warm_up`` untimed steps, stopping early
    once two timed steps agree within ``STABLE`` (then their mean)."""
    times = []
    for x, y in batches:
        wait_for_device(device)
        start = time.perf_counter()
        step(x, y)
        wait_for_device(device)
        times.append(time.perf_counter() - start)
        timed = times[warm_up:]  # a warm-up step pays for kernels, allocators, optimizer state
        if len(timed) == 2 and abs(timed[0] - timed[1]) <= STABLE * min(timed):
            break
    return statistics.median(times[warm_up:] or times)


def measure_timing(
    backbone,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    train_steps: int,
    val_steps: int,
    precision: str = "32-true",
    device: str | torch.device = "cpu",
    load: float = 0.0,
    frozen_forward: float | None = None,
    frozen_precision: str | None = None,
) -> Timing:
    """Time the training steps (every group trainable, the last groups) on ``batches``, and the
    frozen forward passes not already measured.

    ``batches`` are real training batches at the advised batch size (2 or more; 3 give the full
    step a warm-up and two timed steps, stopping once two agree within ``STABLE``). One copy of
    the backbone serves every measurement; the caller's weights and frozen state are untouched.
    The full step runs first and warms the kernels that the last-groups step and the eval forward
    reuse, so only it has an untimed warm-up step. ``frozen_forward`` is the seconds per batch of
    a frozen eval forward already measured at ``frozen_precision`` (``advise``: its embedding
    pass); when absent it is measured here, and so is the eval forward at ``precision`` when the
    two precisions differ. ``load`` is the measured seconds to fetch one batch, added to every
    step.

    Example:
        >>> t = measure_timing(bb, [next(it) for _ in range(3)], 10, train_steps=17, val_steps=6)  # doctest: +SKIP
        >>> t.epoch_seconds("full_finetune")  # doctest: +SKIP
    """
    device = torch.device(device)
    frozen_precision = frozen_precision or precision
    net = copy.deepcopy(backbone).to(device).to(memory_format=torch.channels_last)
    head = nn.Linear(net.feature_dim, num_classes).to(device)
    batches = [
        (x.to(device).contiguous(memory_format=torch.channels_last), y.to(device))
        for x, y in batches
    ]
    groups = net.group_names()
    n_last = last_groups_count(len(groups))

    def forward_at(prec):
        def forward(x, y):
            with torch.no_grad(), _autocast(prec, device):
                head(net(x))

        return forward

    def trainer_step(optimizer):
        def step(x, y):
            with _autocast(precision, device):
                loss = F.cross_entropy(head(net(x)).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    net.train()
    net.unfreeze()
    params = [*net.parameters(), *head.parameters()]
    t_full = _median_step(trainer_step(torch.optim.AdamW(params)), batches, device)
    net.freeze(groups[: len(groups) - n_last], bn="eval")
    params = [p for p in [*net.parameters(), *head.parameters()] if p.requires_grad]
    t_last = _median_step(trainer_step(torch.optim.AdamW(params)), batches, device, warm_up=0)
    net.eval()
    if frozen_forward is None:
        frozen_forward = _median_step(forward_at(frozen_precision), batches, device)
    t_val = None
    if frozen_precision != precision:
        t_val = _median_step(forward_at(precision), batches, device, warm_up=0)
    return Timing(frozen_forward, t_last, t_full, train_steps, val_steps, load, t_val)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one pass over ``n`` samples (the datamodule drops the last train batch when n > batch)."""
    return n // batch_size if drop_last and n > batch_size else math.ceil(n / batch_size)
