"""Small builders shared by tests: tiny models and data that train in a second on CPU."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer

from tl_lightning.cli import run_cli
from tl_lightning.data import DigitsDataModule

TINY = {"backbone": "resnet18", "weights": None}
# a datamodule's preprocessing for TINY at 32 px, small batches, no worker processes
TINY_DATA = {**TINY, "image_size": 32, "batch_size": 4, "num_workers": 0}


def tiny_digits(**kwargs) -> DigitsDataModule:
    """Real digits at 32 px with a random-init resnet18's preprocessing."""
    kwargs = {"image_size": 32, "batch_size": 32, **TINY, **kwargs}
    return DigitsDataModule(**kwargs)


def quick_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    return Trainer(**{**defaults, **kwargs})


def print_config(args: list[str], capsys) -> str:
    """The YAML ``tl-lightning <args> --print_config`` prints (it exits 0)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def tiny_fit_args(config, root) -> list[str]:
    """``fit`` of a shipped config with TINY_DATA on a prepared, download-free data root."""
    return [
        "fit",
        "--config",
        str(config),
        "--model.init_args.backbone=resnet18",
        "--model.init_args.weights=null",
        f"--data.init_args.root={root}",
        "--data.init_args.download=false",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--trainer.fast_dev_run=true",
    ]
