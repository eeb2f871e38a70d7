"""WiSE-FT (Wortsman et al. 2022): interpolate the starting and the fine-tuned weights, pick ``a`` on validation.

``theta(a) = (1 - a) theta_0 + a theta_ft`` over the backbone and the head (BatchNorm running
statistics included; integer buffers such as ``num_batches_tracked`` come from the fine-tuned
model). ``theta_0`` is the run's frozen starting point: the pretrained backbone with the head it
started from (the probe's head with LP-FT, ``init_head: probe``; a random head otherwise, which
makes small ``a`` useless: use WiSE-FT with LP-FT). ``a`` is chosen on validation data only.

Example:
    >>> result = wise_ft(model, datamodule.val_dataloader())       # doctest: +SKIP
    >>> result.a, result.curve[0]                                    # doctest: +SKIP
    (0.5, {'a': 0.0, 'val_acc': 0.91, 'source_agreement': 1.0})
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from tl_lightning.forgetting import ReferenceSet

DEFAULT_GRID = tuple(i / 10 for i in range(11))


def interpolate_state(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], a: float) -> dict[str, torch.Tensor]:
    """``(1 - a) start + a end`` for floating tensors; other tensors (counters) taken from ``end``."""
    if start.keys() != end.keys():
        raise ValueError(f"state dicts differ: {sorted(set(start) ^ set(end))[:5]}")
    return {
        k: torch.lerp(start[k].float(), v.float(), a).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in end.items()
    }


@dataclass
class WiseFTResult:
    """The chosen ``a``, the curve over the grid, and the chosen network's ``backbone``/``head`` states."""

    a: float
    curve: list[dict[str, float]] = field(default_factory=list)
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, loader: Iterable, forward_context: Callable = contextlib.nullcontext) -> float:
    """Top-1 accuracy of ``head(backbone(x))`` over ``loader`` (eval mode, the module's device)."""
    device = next(backbone.parameters()).device
    correct = total = 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        with forward_context():
            pred = head(backbone(x)).argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


def wise_ft(
    model: nn.Module,
    val_loader: Iterable,
    grid: Sequence[float] = DEFAULT_GRID,
    reference: ReferenceSet | None = None,
    forward_context: Callable = contextlib.nullcontext,
) -> WiseFTResult:
    """Evaluate ``theta(a)`` for ``a`` in ``grid`` on ``val_loader``; keep the best and load it into ``model``.

    ``model`` is a :class:`~tl_lightning.modules.FineTuneModule` with a starting point
    (``model.start``). Ties go to the smallest ``a`` (the closest to the start). With a
    ``reference`` set the curve also holds ``source_agreement`` and ``cka_drift`` per ``a``.
    """
    start = getattr(model, "start", None)
    if start is None:
        raise ValueError("WiSE-FT needs the run's starting point: FineTuneModule(..., track_forgetting=True) or init_head: probe")
    if not grid or any(not 0 <= a <= 1 for a in grid):
        raise ValueError(f"WiSE-FT grid must be values in [0, 1], got {list(grid)}")
    ends = {"backbone": _copy(model.backbone), "head": _copy(model.head)}
    starts = {"backbone": _copy(start.backbone), "head": _copy(start.head)}
    was_training = model.training
    model.eval()
    curve, best = [], None
    for a in sorted(grid):
        for part in ("backbone", "head"):
            getattr(model, part).load_state_dict(interpolate_state(starts[part], ends[part], a))
        row = {"a": float(a), "val_acc": accuracy(model.backbone, model.head, val_loader, forward_context)}
        if reference is not None:
            row.update(reference.measure(model.backbone, start))
        curve.append(row)
        if best is None or row["val_acc"] > best["val_acc"]:
            best = row
    state = {part: interpolate_state(starts[part], ends[part], best["a"]) for part in ("backbone", "head")}
    for part, s in state.items():
        getattr(model, part).load_state_dict(s)
    model.train(was_training)
    return WiseFTResult(best["a"], curve, state)


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
