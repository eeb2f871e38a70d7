"""Atomic checkpoint saves, and ``--ckpt_path last`` found across a logger's run versions.

Lightning 2.6's ``TorchCheckpointIO`` serialises the whole checkpoint into memory, then writes it
through an fsspec transaction whose temporary file lives in the system temp folder
(``tempfile.mkstemp()``) and is moved into place with ``shutil.move``: across filesystems that
move is a copy onto the target (a kill mid-copy truncates ``last.ckpt``), nothing is fsynced, and
memory peaks at twice the checkpoint size. :class:`AtomicCheckpointIO` instead streams it with
:func:`~tl_lightning.file_io.atomic_write` into a temporary file next to the target, fsyncs
it, and ``os.replace``-s it over the target.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from tl_lightning.file_io import atomic_write
from tl_lightning.lightning_compat import (
    choose_logger_version,
    configured_checkpoint_io,
    logger_version_chosen,
)

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic, fsynced and streamed (no 2x memory).

    Remote paths (``s3://``, ...) go through Lightning's own transaction-based writer. Loading is
    Lightning's (``weights_only`` as the caller asks). The CLI installs it for every run.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()], logger=False)
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        protocol = get_filesystem(path).protocol
        local = "file" in ({protocol} if isinstance(protocol, str) else set(protocol))
        if storage_options is not None or not local:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        log.debug("saving checkpoint atomically: %s", path)
        atomic_write(path, lambda f: torch.save(checkpoint, f), what="checkpoint")


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` unless it was configured with another one."""
    strategy = trainer.strategy
    current = configured_checkpoint_io(strategy)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def resolve_last(trainer: Any, ckpt_path: str | None) -> str | None:
    """``ckpt_path`` with ``"last"`` resolved across the logger's run versions.

    Lightning looks for ``last.ckpt`` only in the checkpoint folder of the *new* run, which under
    a versioned logger (``runs/<name>/version_<n+1>/checkpoints``) is empty, so ``--ckpt_path
    last`` would silently start from scratch. This finds the newest ``last*.ckpt`` under the
    logger's ``<save_dir>/<name>/*/checkpoints/`` and continues logging in that version's folder.
    Unchanged when a ``checkpoint.dirpath`` is set (Lightning finds it) or nothing is found.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = trainer.checkpoint_callback
    logger = trainer.logger
    root = getattr(logger, "root_dir", None) if logger is not None else None
    if ckpt_path != "last" or not isinstance(callback, ModelCheckpoint) or root is None:
        return ckpt_path
    if callback.dirpath is not None:
        return ckpt_path
    found = [p for p in Path(root).glob("*/checkpoints/last*.ckpt") if p.is_file()]
    if not found:
        return ckpt_path
    newest = max(found, key=lambda p: p.stat().st_mtime)
    if not logger_version_chosen(logger):  # log into the resumed run's folder
        folder = newest.parent.parent.name
        # the logger names its folders version_<int>; a string version would become the folder
        # name as is, but the progress bar shows its last 4 characters (v_num=on_0)
        number = folder.removeprefix("version_")
        choose_logger_version(logger, int(number) if number.isdigit() else folder)
    log.info("resuming from %s", newest)
    return str(newest)
