"""ModelCheckpoint whose ``last.ckpt`` is always fresh: a resume point every N steps and epoch."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class ResumableModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` where ``last.ckpt`` is the resume point and best files follow validation.

    Two Lightning 2.6 behaviours make ``last.ckpt`` stale with a monitored metric (our
    ``val/acc``), so ``--ckpt_path last`` after a kill would redo work or miss it entirely:

    * a step-triggered save (``every_n_train_steps``) is deferred until the next validation when
      the metric is not logged yet or validation follows the batch, and ``last.ckpt`` with it: no
      mid-epoch checkpoint at all in the first epoch;
    * at the end of an epoch ``last.ckpt`` is only rewritten when the top-k file was (the metric
      improved), and ``every_n_train_steps`` switches the per-epoch trigger off.

    Here ``every_n_train_steps`` only sets how often ``last.ckpt`` is refreshed during training,
    the best-``val/acc`` files are still chosen at every validation (fresh metric), and
    ``last.ckpt`` is rewritten after every validation (or train epoch without one).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> ckpt = ResumableModelCheckpoint(monitor="val/acc", mode="max", save_last=True,
        ...                                 every_n_train_steps=100)
        >>> trainer = Trainer(callbacks=[ckpt], logger=False)
    """

    _resume_every = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._every_n_train_steps > 0:  # move the step trigger to last.ckpt only
            self._resume_every = self._every_n_train_steps
            self._every_n_train_steps = 0
            if self._every_n_epochs == 0 and self._train_time_interval is None:
                self._every_n_epochs = 1

    @staticmethod
    def _not_fitting(trainer: Trainer) -> bool:
        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
        )

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        due = self._resume_every > 0 and step % self._resume_every == 0
        if not (self.save_last and due) or self._not_fitting(trainer):
            return
        previous = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        # a validation right after this batch must still be allowed to save top-k at this step
        self._last_global_step_saved = previous

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._last_due(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._last_due(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _last_due(self, trainer: Trainer) -> bool:
        return bool(self.save_last) and not self._not_fitting(trainer)
