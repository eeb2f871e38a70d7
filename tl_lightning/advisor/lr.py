"""The learning rate for the advised config, from Lightning's LR range test (``--lr_find``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml


def find_lr(config: dict, num_training: int = 50) -> float | None:
    """Lightning's ``lr_find`` suggestion for ``config`` (a ``tl-lightning fit`` config dict).

    The model, data and callbacks are built exactly as ``tl-lightning fit`` builds them (gradual
    unfreezing included: the test then runs in the head-only phase). ``None`` when Lightning has
    no suggestion (too few points).
    """
    from lightning.pytorch.tuner import Tuner

    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "advised.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        cli = run_cli(
            ["--config", str(path), "--trainer.logger=false", f"--trainer.default_root_dir={tmp}"],
            run=False,
        )
        finder = Tuner(cli.trainer).lr_find(
            cli.model, datamodule=cli.datamodule, update_attr=False, num_training=num_training
        )
        return None if finder is None else finder.suggestion()
