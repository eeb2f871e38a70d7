"""Few-shot: the distribution of per-episode accuracies as a TensorBoard histogram."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tl_lightning.callbacks.visual_utils import tensorboard_writer


class EpisodeAccuracyHistogram(Callback):
    """Logs ProtoNet's per-episode accuracies as histograms ``val/episode_acc``, ``test/episode_acc``.

    The mean with its 95 % interval is a scalar (``test/acc``, ``test/acc_ci95``); the histogram
    shows the spread behind it (a few hard episodes, or uniformly mediocre ones). It reads the
    accuracies the module gathers over all ranks (``test_episode_accuracies``, and
    ``val_episode_accuracies`` where the module keeps them) and writes on rank 0. A no-op for
    other modules or without a TensorBoardLogger.

    Example:
        >>> trainer = Trainer(callbacks=[EpisodeAccuracyHistogram()], logger=TensorBoardLogger("runs"))
    """

    def __init__(self) -> None:
        self._last: dict[str, torch.Tensor] = {}

    def _log(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        writer = tensorboard_writer(trainer)
        accs = getattr(module, f"{stage}_episode_accuracies", None)
        # the module replaces the tensor every epoch: the same object again means nothing new
        if writer is None or not isinstance(accs, torch.Tensor) or accs.numel() == 0:
            return
        if self._last.get(stage) is accs:
            return
        self._last[stage] = accs
        writer.add_histogram(
            f"{stage}/episode_acc", accs.float().cpu(), global_step=trainer.global_step, bins="auto"
        )

    # on_*_end: the module fills the accuracies in its epoch-end hook, after the callbacks' one
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "test")
