"""The one place that reaches into Lightning's private API (written for Lightning 2.6).

Each use has no public hook in Lightning 2.6; ``tests/test_lightning_compat.py`` fails when an
upgrade removes or changes one, and ``pyproject.toml`` pins ``lightning>=2.6,<2.7`` until then.
``cli.py``'s ``TLCLI`` also overrides LightningCLI's private ``_add_subcommands``,
``_run_subcommand`` and ``_parse_ckpt_path`` (checked by the same test).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import _get_short_description

LIGHTNING_WRITTEN_FOR = "2.6"


def configured_checkpoint_io(strategy: Any) -> Any | None:
    """The CheckpointIO a user configured on ``strategy``, or None (the public
    ``strategy.checkpoint_io`` property creates a default one instead of saying "none")."""
    return getattr(strategy, "_checkpoint_io", None)


def logger_version_chosen(logger: Any) -> bool:
    """Whether a TensorBoard/CSV logger has fixed its ``version_N`` folder (reading the public
    ``logger.version`` would fix it)."""
    return getattr(logger, "_version", "") is not None


def choose_logger_version(logger: Any, version: int | str) -> None:
    """Make a logger that has not chosen yet log into ``version`` (a resumed run's folder)."""
    logger._version = version


def short_description(fn: Callable) -> str:
    """The first docstring line LightningCLI shows for a subcommand."""
    return _get_short_description(fn)
