"""Fails when a Lightning upgrade changes a private API tl-lightning relies on (lightning_compat.py)."""

from __future__ import annotations

import inspect

import lightning
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from tl_lightning.lightning_compat import (
    LIGHTNING_WRITTEN_FOR,
    choose_logger_version,
    configured_checkpoint_io,
    logger_version_chosen,
    short_description,
)


def test_written_for_this_lightning():
    assert lightning.__version__.startswith(LIGHTNING_WRITTEN_FOR + ".")


def test_strategy_reports_no_configured_checkpoint_io(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu")
    assert configured_checkpoint_io(trainer.strategy) is None
    _ = trainer.strategy.checkpoint_io  # the public property fills in a default one
    assert configured_checkpoint_io(trainer.strategy) is not None


def test_logger_version_is_chosen_lazily_and_can_be_set(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    assert not logger_version_chosen(logger)
    choose_logger_version(logger, "version_7")
    assert logger_version_chosen(logger) and logger.log_dir.endswith("version_7")


def test_overridden_cli_internals_still_exist():
    for name in ("_add_subcommands", "_run_subcommand", "_parse_ckpt_path",
                 "_prepare_subcommand_parser", "_prepare_subcommand_kwargs"):  # fmt: skip
        assert callable(getattr(LightningCLI, name, None)), name
    assert list(inspect.signature(LightningCLI._run_subcommand).parameters) == [
        "self",
        "subcommand",
    ]
    assert short_description(Trainer.fit) == "Runs the full optimization routine."
