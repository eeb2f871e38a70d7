"""Atomic file writes: a kill or a full disk during a write leaves the previous good file.

Lightning 2.6's ``TorchCheckpointIO`` serialises the whole checkpoint into memory, then writes it
through an fsspec transaction whose temporary file lives in the system temp folder
(``tempfile.mkstemp()``) and is moved into place with ``shutil.move``: across filesystems that
move is a copy onto the target (a kill mid-copy truncates ``last.ckpt``), nothing is fsynced, and
memory peaks at twice the checkpoint size. :func:`atomic_write` instead streams into a temporary
file next to the target, fsyncs it, and ``os.replace``-s it over the target (atomic on POSIX and
Windows on the same filesystem), then fsyncs the folder so the rename survives a power cut.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from tl_lightning.errors import TLError

log = logging.getLogger(__name__)

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(TLError, OSError):
    """The disk (or quota) filled up while writing a file; the previous file was kept."""


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove_stale_temps(path: Path) -> None:
    """Delete temporaries of ``path`` left by writers that were killed (their pid is gone)."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except OSError:  # alive but not ours (EPERM): leave it
            pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full_error(path: Path, error: OSError, what: str = "file") -> DiskFullError:
    """A :class:`DiskFullError` naming ``path`` and what to do."""
    return DiskFullError(
        error.errno,
        f"disk full while writing {what} '{path}' ({error.strerror or error}); the previous "
        f"file, if any, was kept and no partial file was left. Free space on "
        f"{path.parent} or write elsewhere (e.g. --checkpoint.dirpath, "
        f"--prediction_writer.output, TL_LIGHTNING_CACHE)",
        str(path),
    )


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None], what: str = "file") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, and rename it to ``path``.

    On any failure (an exception, a full disk) the temporary file is removed and ``path`` keeps
    its previous content; a full disk raises :class:`DiskFullError` naming the path. A process
    killed mid-write leaves only a hidden ``.<name>.tmp-<pid>`` file, removed by the next write.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "hello.txt"
        >>> atomic_write(target, lambda f: f.write(b"hi")).read_bytes()
        b'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS and not isinstance(e, DiskFullError):
            raise disk_full_error(path, e, what) from e
        raise
    _fsync_dir(path.parent)
    return path


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
    current = getattr(strategy, "_checkpoint_io", None)
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
    if getattr(logger, "_version", "") is None:  # not yet chosen: log into the resumed run's folder
        folder = newest.parent.parent.name
        # the logger names its folders version_<int>; a string version would become the folder
        # name as is, but the progress bar shows its last 4 characters (v_num=on_0)
        number = folder.removeprefix("version_")
        logger._version = int(number) if number.isdigit() else folder
    log.info("resuming from %s", newest)
    return str(newest)
