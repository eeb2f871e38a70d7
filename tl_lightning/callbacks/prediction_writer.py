"""Write predictions to CSV as they come, so a killed run loses at most the current batch."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter


class CSVPredictionWriter(BasePredictionWriter):
    """Append ``file, class, probability`` rows to ``output`` after every predict batch.

    Under DDP each rank writes ``<output stem>.rank<k>.csv`` and rank 0 merges them in order at the
    end, so the final file has every input exactly once.
    """

    def __init__(self, output: str = "predictions.csv"):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self._file = None
        self._writer = None

    def _path(self, trainer) -> Path:
        if trainer.world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.stem}.rank{trainer.global_rank}{self.output.suffix}")

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "w", newline="")  # noqa: SIM115 (kept open across batches)
        self._writer = csv.writer(self._file)
        self._writer.writerow(["file", "class", "probability"])

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        if not prediction or prediction.get("id") is None:
            return
        best = prediction["probs"].max(dim=1).values.tolist()
        for file, name, prob in zip(prediction["id"], prediction["class_name"], best):
            self._writer.writerow([file, name, f"{prob:.6f}"])
        self._file.flush()

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if trainer.world_size > 1:
            trainer.strategy.barrier()
            if trainer.is_global_zero:
                self._merge(trainer.world_size)

    def _merge(self, world_size: int) -> None:
        rows: dict[str, list[str]] = {}
        for rank in range(world_size):
            part = self.output.with_name(f"{self.output.stem}.rank{rank}{self.output.suffix}")
            with open(part, newline="") as f:
                for row in list(csv.reader(f))[1:]:
                    rows.setdefault(row[0], row)  # DistributedSampler pads with repeats: keep one
            part.unlink()
        with open(self.output, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "class", "probability"])
            writer.writerows(rows[k] for k in sorted(rows))
