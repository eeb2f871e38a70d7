"""Checkpoint the global random state so a resumed run draws the same random numbers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _collect_rng_states() -> dict[str, Any]:
    """Every global RNG state, as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("torch.cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


class RNGStateCheckpoint(Callback):
    """Save the torch/CUDA/numpy/Python RNG states in checkpoints and restore them on resume.

    Lightning checkpoints do not hold the global RNG, so after ``--ckpt_path last`` dropout masks
    and main-process augmentations draw different numbers than the uninterrupted run would have.
    This callback stores the state at save time and puts it back at ``on_train_start`` of the
    resumed run (after setup, model building and the sanity check, which draw numbers of their
    own). Under DDP the checkpoint holds every rank's state and each rank restores its own.
    Validation runs inside a saved/restored RNG state, so how often one validates, and
    where a checkpoint falls relative to validation, does not change the training stream.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RNGStateCheckpoint()], logger=False)
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._outside_validation = _collect_rng_states()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._outside_validation is not None:
            _set_rng_states(self._outside_validation)
            self._outside_validation = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._to_restore is not None:
            per_rank = self._to_restore.get("rng_per_rank") or []
            # each rank its own stream; another world size (or an old file) gets rank 0's
            same_world = len(per_rank) == trainer.world_size
            _set_rng_states(per_rank[trainer.global_rank] if same_world else self._to_restore["rng"])
            self._to_restore = None

    def state_dict(self) -> dict[str, Any]:
        # a save inside validation (ModelCheckpoint on_validation_end) records the training stream
        states = self._outside_validation or _collect_rng_states()
        per_rank = [states]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank builds the checkpoint (only rank 0 writes it): gather each rank's stream
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, states)
        return {"rng": per_rank[0], "rng_per_rank": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict if state_dict.get("rng") is not None else None
