"""L2-SP + LwF + LP-FT under 2-process CPU DDP, bf16 and GradualUnfreezing: ranks stay identical."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

DDP_SCRIPT = """
import functools, sys, torch
torch.set_num_threads(1)
from lightning.pytorch import Trainer, seed_everything
from tl_lightning.callbacks import ForgettingMonitor, GradualUnfreezing
from tl_lightning.data import DigitsDataModule
from tl_lightning.modules import FineTuneModule

seed_everything(0)
model = FineTuneModule(num_classes=10, init_head="probe", l2sp_alpha=0.1, l2sp_beta=0.01, lwf_alpha=1.0,
                       channels_last=False, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
initial = {k: v.clone() for k, v in model.state_dict().items()}
dm = DigitsDataModule(backbone="efficientnet_lite0", image_size=32, batch_size=8, num_workers=0)
trainer = Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", precision="bf16-mixed",
                  logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                  callbacks=[GradualUnfreezing(every_n_epochs=1), ForgettingMonitor(num_images=4, image_size=64)])
trainer.fit(model, dm)
logged = sorted(k for k in trainer.callback_metrics)
torch.save({"final": model.state_dict(), "initial": initial, "logged": logged}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


def test_two_process_ddp_with_regularisers_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env_cache = {"TL_LIGHTNING_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    import os

    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=420, env={**os.environ, **env_cache},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in ("train/l2sp_epoch", "train/l2sp_head_epoch", "train/lwf_epoch", "val/source_agreement", "val/cka_drift"):
        assert name in r0["logged"], r0["logged"]
    moved = [k for k in r0["final"] if k.startswith(("head.", "backbone.")) and not torch.equal(r0["final"][k], r0["initial"][k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("head.") for k in moved)
    for k in r0["final"]:  # BN running stats are per-rank by design (no SyncBatchNorm); weights are not
        if "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(r1["final"][k], r0["final"][k], rtol=0, atol=0, msg=k)
    for k in (k for k in r0["final"] if k.startswith(("start.backbone.", "start.source_head."))):  # never trains
        torch.testing.assert_close(r0["final"][k], r0["initial"][k], rtol=0, atol=0, msg=k)
