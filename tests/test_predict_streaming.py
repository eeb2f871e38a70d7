"""Predict streams: rows reach the CSV batch by batch, nothing accumulates, failures cut cleanly."""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback
from PIL import Image

from tl_lightning.cli import run_cli
from tl_lightning.file_io import DiskFullError

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
PREDICT_CONFIG = f"""
model:
  class_path: tl_lightning.modules.finetune.FineTuneModule
  init_args:
    backbone: conv4
    weights: null
data:
  class_path: tl_lightning.data.DigitsDataModule
  init_args:
    image_size: 16
    batch_size: {BATCH}
    num_workers: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
"""


class KillAtPredictBatch(Callback):
    """SIGKILL this process as predict batch ``batch`` starts (earlier batches are written)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(60):
        Image.new("RGB", (16, 16), (i * 4, 255 - i * 4, 128)).save(folder / f"img{i:03d}.png")
    (tmp_path / "predict.yaml").write_text(PREDICT_CONFIG)
    return folder


def _rows(path: Path) -> list[list[str]]:
    text = path.read_text()
    assert text.endswith("\n"), "the CSV ends in the middle of a row"
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["file", "class", "probability"]
    for row in rows[1:]:  # every row complete and well-formed
        assert len(row) == 3 and Path(row[0]).name.startswith("img") and row[1] in "0123456789"
        assert 0.0 < float(row[2]) <= 1.0
    return rows[1:]


def _predict_args(tmp_path: Path, image_dir: Path) -> list[str]:
    return [
        "predict",
        "--config",
        str(tmp_path / "predict.yaml"),
        f"--data.init_args.predict_dir={image_dir}",
        f"--prediction_writer.output={tmp_path / 'preds.csv'}",
    ]


def test_sigkill_mid_predict_keeps_every_finished_batch_as_complete_rows(tmp_path, image_dir):
    kill = ["--trainer.callbacks+=tests.test_predict_streaming.KillAtPredictBatch"]
    cmd = [sys.executable, "-m", "tl_lightning", *_predict_args(tmp_path, image_dir), *kill]
    cmd.append("--trainer.callbacks.batch=4")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    rows = _rows(tmp_path / "preds.csv")
    assert len(rows) == 4 * BATCH  # batches 0-3 all there, only batch 4 (in flight) lost
    assert len({r[0] for r in rows}) == len(rows)


def test_predict_streams_without_keeping_predictions(tmp_path, image_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(_predict_args(tmp_path, image_dir))
    assert cli.trainer.predict_loop.return_predictions is False  # Lightning keeps nothing
    assert cli.trainer.predict_loop.predictions == []
    assert sorted(Path(r[0]).name for r in _rows(tmp_path / "preds.csv")) == [
        f"img{i:03d}.png" for i in range(60)
    ]


def test_full_disk_while_writing_predictions_cuts_back_to_complete_rows(
    tmp_path, image_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    real_write, calls = os.write, []

    def filling_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # header, batch 0, then half of batch 1 fits before the disk is full
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("tl_lightning.callbacks.prediction_writer.os.write", filling_disk)
    with pytest.raises(DiskFullError, match="disk full") as info:
        run_cli(_predict_args(tmp_path, image_dir))
    assert str(tmp_path / "preds.csv") in str(info.value)
    assert len(_rows(tmp_path / "preds.csv")) == BATCH  # batch 0 only, no half row
