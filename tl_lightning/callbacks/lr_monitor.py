"""LearningRateMonitor that stands aside when logging is off (``--trainer.logger=false``)."""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor


class LRMonitor(LearningRateMonitor):
    """Lightning's LearningRateMonitor (per named param group), silent instead of failing without a logger."""

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        self._disabled = not trainer.loggers
        if not self._disabled:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if not getattr(self, "_disabled", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if not getattr(self, "_disabled", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)
