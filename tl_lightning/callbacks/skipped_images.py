"""End-of-epoch report of the images that failed to load and were dropped from their batches."""

from __future__ import annotations

import logging
from collections import Counter

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from tl_lightning.data.base import skip_log_path
from tl_lightning.data.decode import read_skip_log

log = logging.getLogger(__name__)


class SkippedImagesReport(Callback):
    """Count the images skipped since the last report and say where the list is, each epoch.

    Datasets record every image that fails to decode (in any DataLoader worker, on any rank) in
    ``skipped_images.csv`` in the run folder; this callback sums up the new rows at the end of
    each train, validate, test and predict epoch and logs ``data/skipped_images`` (cumulative).
    On by default in the ``tl-lightning`` CLI.

    Example:
        >>> trainer = Trainer(callbacks=[SkippedImagesReport()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.reported = 0  # rows of the skip log already reported
        self.total = 0  # skipped during this run (what `data/skipped_images` shows)
        self.history: list[tuple[str, int]] = []  # (stage and epoch, newly skipped)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        path = skip_log_path(trainer)
        self.reported = len(read_skip_log(path)) if path is not None else 0

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> int:
        path = skip_log_path(trainer)
        if path is None:
            return 0
        rows = read_skip_log(path)
        new = rows[self.reported :]
        self.reported = len(rows)
        if not new:
            return 0
        self.total += len(new)
        label = f"{stage} epoch {trainer.current_epoch}"
        self.history.append((label, len(new)))
        by_split = Counter(row["split"] for row in new)
        splits = ", ".join(f"{n} {split}" for split, n in sorted(by_split.items()))
        rank_zero_warn(
            f"{label}: skipped {len(new)} image(s) that failed to load ({splits}); they were "
            f"dropped from their batches, not replaced. Paths and reasons: {path}"
        )
        return len(new)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._report(trainer, pl_module, "train") or self.total:
            pl_module.log("data/skipped_images", float(self.total), rank_zero_only=True)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # during fit, the train epoch end reports
            self._report(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "predict")

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total = state_dict.get("total", 0)
