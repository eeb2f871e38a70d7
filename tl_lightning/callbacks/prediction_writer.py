"""Write predictions to CSV as they come, so a killed run loses at most the current batch."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from tl_lightning.file_io import atomic_write, disk_full_error, is_disk_full

HEADER = ["file", "class", "probability"]


def _csv_text(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


class CSVPredictionWriter(BasePredictionWriter):
    """Append ``file, class, probability`` rows to ``output`` after every predict batch.

    Each batch's rows go to the file in one unbuffered ``os.write`` (no Python buffer holds
    them), so memory stays flat however many images there are and a process killed mid-run
    leaves a CSV of complete rows: everything up to the previous batch. A failed write (a full
    disk) truncates the file back to its last complete row and raises
    :class:`~tl_lightning.checkpoint_io.DiskFullError` naming the path.

    Under DDP each rank writes ``<output stem>.rank<k>.csv`` and rank 0 merges them in order at the
    end (atomically), so the final file has every input exactly once.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[CSVPredictionWriter("preds.csv")], logger=False)
    """

    def __init__(self, output: str = "predictions.csv") -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self._fd: int | None = None
        self._path: Path | None = None
        self._good = 0  # bytes of complete rows written so far

    def _rank_path(self, trainer: Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output
        name = f"{self.output.stem}.rank{trainer.global_rank}{self.output.suffix}"
        return self.output.with_name(name)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._path = self._rank_path(trainer)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._good = 0
        self._append(_csv_text([HEADER]))

    def _append(self, text: str) -> None:
        """Write ``text`` completely, or cut the file back to its last complete row and raise."""
        data = memoryview(text.encode())
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError as e:
            os.ftruncate(self._fd, self._good)  # frees space, so it works on a full disk
            self._close()
            if is_disk_full(e):
                raise disk_full_error(self._path, e, "predictions") from e
            raise
        self._good += len(text.encode())

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not prediction or prediction.get("id") is None or self._fd is None:
            return
        best = prediction["probs"].max(dim=1).values.tolist()
        rows = [
            [file, name, f"{prob:.6f}"]
            for file, name, prob in zip(prediction["id"], prediction["class_name"], best)
        ]
        self._append(_csv_text(rows))

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()
        if trainer.world_size > 1:
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                self._merge(trainer.world_size)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def _merge(self, world_size: int) -> None:
        rows: dict[str, list[str]] = {}
        parts = [
            self.output.with_name(f"{self.output.stem}.rank{rank}{self.output.suffix}")
            for rank in range(world_size)
        ]
        for part in parts:
            with open(part, newline="") as f:
                for row in list(csv.reader(f))[1:]:
                    rows.setdefault(row[0], row)  # DistributedSampler pads with repeats: keep one
        text = _csv_text([HEADER, *(rows[k] for k in sorted(rows))])
        atomic_write(self.output, lambda f: f.write(text.encode()), what="predictions")
        for part in parts:
            part.unlink()
