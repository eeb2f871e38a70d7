"""Faults: SIGKILL mid-epoch then ``--ckpt_path last``, kills and full disks during writes, NaN loss."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import TensorDataset

from tl_lightning.callbacks.finite_loss import NonFiniteLossError
from tl_lightning.checkpoint_io import AtomicCheckpointIO
from tl_lightning.cli import run_cli
from tl_lightning.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler
from tl_lightning.feature_cache import cached_features
from tl_lightning.file_io import DiskFullError, atomic_write

ROOT = Path(__file__).resolve().parents[1]
# the quickstart config with a tiny random-init backbone and no feature cache
TINY_QUICKSTART = [
    "fit",
    "--config",
    str(ROOT / "configs/quickstart.yaml"),
    "--model.init_args.backbone=resnet18",
    "--model.init_args.weights=null",
    "--model.init_args.cache_features=false",
    "--data.init_args.image_size=16",
]


# --- helpers the CLI runs import by class path ------------------------------------------
class KillAtStep(Callback):
    """SIGKILL this process when training reaches ``step`` (no cleanup, like an OOM killer)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonAtStep(Callback):
    """Turn the inputs of the batch at ``step`` into NaN (a diverging run in one line)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


# --- 1. SIGKILL mid-epoch, resume with --ckpt_path last ------------------------------------------
RESUME_CONFIG = """
seed_everything: 0
model:
  class_path: tl_lightning.modules.finetune.FineTuneModule
  init_args:
    backbone: conv4            # tiny (113k params): checkpoints of ~1.5 MB
    weights: null
    head_dropout: 0.3          # dropout and augmentation draw from the RNG: both must resume
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.001}
data:
  class_path: tl_lightning.data.DigitsDataModule
  init_args:
    image_size: 16
    batch_size: 32
    augment: basic
    split: [0.2, 0.05, 0.75]   # 359 train images: 11 steps per epoch
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
checkpoint:
  every_n_train_steps: 3
"""


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_mid_epoch_then_ckpt_path_last_matches_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resume.yaml").write_text(RESUME_CONFIG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same float reduction order as the OMP_NUM_THREADS=1 child
    try:
        # reference: uninterrupted, in this process (imports are paid once)
        run_cli(["fit", "--config", "resume.yaml", "--trainer.logger=false",
                 "--checkpoint.dirpath=uninterrupted"])  # fmt: skip

        # a child process is SIGKILLed in the middle of epoch 0, at step 8
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        killer = ["--trainer.callbacks+=tests.test_faults.KillAtStep", "--trainer.callbacks.step=8"]
        cmd = [sys.executable, "-m", "tl_lightning", "fit", "--config", "resume.yaml", *killer]
        killed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        last = tmp_path / "runs/default/version_0/checkpoints/last.ckpt"
        state = torch.load(last, map_location="cpu", weights_only=True)
        assert state["global_step"] == 6 and state["epoch"] == 0  # mid-epoch 0 (11 steps)

        # resume: a new logger version would be created, 'last' must still find version_0's file
        run_cli(["fit", "--config", "resume.yaml", "--ckpt_path", "last"])
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "runs/default/version_1").exists()  # logs continue in version_0
    assert torch.load(last, weights_only=True)["global_step"] == 22
    expected, got = _weights(tmp_path / "uninterrupted/last.ckpt"), _weights(last)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name].float(), got[name].float(), atol=1e-6), name


def test_resumable_loader_continues_the_same_order_at_the_next_batch():
    data = list(range(20))
    full = ResumableDataLoader(data, batch_size=3, sampler=ResumableRandomSampler(20, seed=5))
    full.sampler.set_epoch(2)
    epoch2 = [b.tolist() for b in full]
    resumed = ResumableDataLoader(data, batch_size=3, sampler=ResumableRandomSampler(20, seed=5))
    resumed.load_state_dict({"epoch": 2, "batches": 4})
    assert [b.tolist() for b in resumed] == epoch2[4:]
    assert resumed.state_dict() == {"epoch": 2, "batches": len(epoch2)}
    assert [b.tolist() for b in resumed] == epoch2  # the next pass is whole again
    finished = ResumableDataLoader(data, batch_size=3, sampler=ResumableRandomSampler(20, seed=5))
    finished.load_state_dict({"epoch": 2, "batches": len(epoch2)})
    assert finished.sampler.epoch == 3  # a completed epoch resumes at the next one


def test_resumable_loader_with_worker_processes_skips_once():
    data = list(range(12))
    loader = ResumableDataLoader(
        data,
        batch_size=2,
        sampler=ResumableRandomSampler(12, seed=0),
        num_workers=2,
        persistent_workers=True,
    )
    whole = ResumableRandomSampler(12, seed=0).order()
    loader.load_state_dict({"epoch": 0, "batches": 4})
    assert sum((b.tolist() for b in loader), []) == whole[8:]
    assert sum((b.tolist() for b in loader), []) == whole


# --- 2. atomic checkpoints ----------------------------------------------------------------------
def _half_then_full_disk(real_save):
    def save(obj, f, *args, **kwargs):
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    return save


def test_full_disk_during_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io_plugin.save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)
    monkeypatch.setattr("tl_lightning.checkpoint_io.torch.save", _half_then_full_disk(torch.save))
    with pytest.raises(DiskFullError, match="disk full") as info:
        io_plugin.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    assert str(target) in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(target.parent) == ["last.ckpt"]  # no temporary left behind
    assert io_plugin.load_checkpoint(target, weights_only=True)["step"] == 1


def test_trainer_save_through_cli_plugin_is_atomic(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        [
            *TINY_QUICKSTART,
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
        ]
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    path = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(path)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # the process is being torn down mid-write

    monkeypatch.setattr("tl_lightning.checkpoint_io.torch.save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.trainer.save_checkpoint(path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert "state_dict" in torch.load(path, weights_only=True)


def test_sigkill_during_a_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_write(target, lambda f: f.write(b"good"))
    child = textwrap.dedent(
        f"""
        import sys, time
        from tl_lightning.file_io import atomic_write

        def slow(f):
            f.write(b"x" * 1_000_000)
            f.flush()
            print("writing", flush=True)
            time.sleep(60)

        atomic_write({str(target)!r}, slow)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b"good"
    stale = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert stale == [f".last.ckpt.tmp-{proc.pid}"]  # hidden, and not a '*.ckpt' file
    atomic_write(target, lambda f: f.write(b"next"))  # the next save sweeps the dead temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert target.read_bytes() == b"next"


# --- 3. NaN / inf loss -------------------------------------------------------------------------
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        *TINY_QUICKSTART,
        "--data.init_args.batch_size=32",
        "--trainer.max_steps=8",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--checkpoint.dirpath=ckpt",
        "--checkpoint.every_n_train_steps=2",
        "--trainer.callbacks+=tests.test_faults.PoisonAtStep",
        "--trainer.callbacks.step=5",
    ]
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 5") as info:
        run_cli(args)
    assert "ckpt/last.ckpt" in str(info.value) and "learning rate" in str(info.value)
    saved = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=True)
    assert saved["global_step"] == 4  # the last save before the bad step, not overwritten
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_inf_loss_is_caught_too(tmp_path):
    class Diverging(LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (self.w * batch[0]).sum() * (float("inf") if batch_idx == 2 else 1.0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from tl_lightning.callbacks.finite_loss import FiniteLossCheck

    model = Diverging()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FiniteLossCheck()],
    )
    data = torch.utils.data.DataLoader(TensorDataset(torch.ones(10, 1)), batch_size=1)
    with pytest.raises(NonFiniteLossError, match="inf at global step 2"):
        trainer.fit(model, data)
    assert torch.isfinite(model.w).all()  # the bad loss never reached backward/step


# --- 4. full disk: feature cache --------------------------------------------------------------
def test_full_disk_while_caching_features_leaves_no_partial_cache(tmp_path, monkeypatch):
    dataset = TensorDataset(torch.randn(6, 3, 8, 8), torch.arange(6))
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
    cached_features(backbone, dataset, key="good", cache_dir=tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tl_lightning.feature_cache.np.save", full)
    with pytest.raises(DiskFullError, match="disk") as info:
        cached_features(backbone, dataset, key="other", cache_dir=tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # no 'other', no temp folder
    assert np.load(tmp_path / "good" / "labels.npy").tolist() == list(range(6))


def test_killed_feature_cache_writer_leaves_no_cache(tmp_path):
    child = textwrap.dedent(
        f"""
        import os, signal, torch
        from torch.utils.data import TensorDataset
        import tl_lightning.feature_cache as fc

        def die(*args, **kwargs):  # after every feature is in the memmap, before labels
            os.kill(os.getpid(), signal.SIGKILL)

        fc.np.save = die
        dataset = TensorDataset(torch.randn(6, 3, 8, 8), torch.arange(6))
        backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
        fc.cached_features(backbone, dataset, key="k", cache_dir={str(tmp_path)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", child], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / "k").exists()  # only the hidden temp folder of the dead writer
    assert all(p.name.startswith(".k.tmp-") for p in tmp_path.iterdir())


# --- last.ckpt is always a fresh resume point --------------------------------------------------
class _FlatVal(LightningModule):
    """Trains a scalar; logs a val/acc that never improves after the first epoch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return ((self.w - batch[0]) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 0.5)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _LastStepProbe(Callback):
    """Record the global_step inside last.ckpt at the start of every step."""

    def __init__(self, path: Path):
        self.path, self.seen = path, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.path.exists():
            saved = torch.load(self.path, weights_only=True)["global_step"]
            self.seen[trainer.global_step] = saved


def test_last_checkpoint_is_refreshed_every_n_steps_and_every_epoch(tmp_path):
    from tl_lightning.callbacks.resumable_checkpoint import ResumableModelCheckpoint

    ckpt = ResumableModelCheckpoint(
        dirpath=tmp_path,
        monitor="val/acc",
        mode="max",
        save_last=True,
        every_n_train_steps=2,
        filename="best",
    )
    probe = _LastStepProbe(tmp_path / "last.ckpt")
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[probe, ckpt],
    )
    data = torch.utils.data.DataLoader(TensorDataset(torch.ones(5, 1)), batch_size=1)
    trainer.fit(_FlatVal(), data, data)
    # epoch 0, before any val/acc exists: Lightning alone defers these saves to validation
    assert probe.seen[3] == 2 and probe.seen[4] == 4 and probe.seen[5] == 5
    final = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert final["global_step"] == 15 and final["epoch"] == 2  # val/acc flat: still refreshed
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["global_step"] == 5
