"""File I/O safety: atomic writes, and one clear error when the disk (or a quota) is full.

:func:`atomic_write` streams into a temporary file next to the target, fsyncs it, and
``os.replace``-s it over the target (atomic on POSIX and Windows on the same filesystem), then
fsyncs the folder so the rename survives a power cut. A kill or a full disk during a write leaves
the previous good file. :func:`is_disk_full` is the one test for "out of space" (``ENOSPC`` or a
quota's ``EDQUOT``) that every writer uses.
"""

from __future__ import annotations

import errno
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from tl_lightning.errors import TLError

log = logging.getLogger(__name__)

# ENOSPC: the disk is full; EDQUOT: the user's quota is (not defined on every platform).
_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


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


def is_disk_full(error: BaseException) -> bool:
    """True when ``error`` says the disk or the user's quota is full (``ENOSPC``, ``EDQUOT``).

    Example:
        >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
        True
    """
    return isinstance(error, OSError) and error.errno in _FULL_ERRNOS


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


def atomic_write_text(
    path: str | Path, write: Callable[[IO[str]], None], what: str = "file"
) -> Path:
    """:func:`atomic_write` for text: ``write`` gets a UTF-8 text file (``newline=""`` for csv)."""

    def write_text(f: IO[bytes]) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        write(text)
        text.flush()
        text.detach()  # leave the binary file open: atomic_write fsyncs and closes it

    return atomic_write(path, write_text, what)


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
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full_error(path, e, what) from e
        raise
    _fsync_dir(path.parent)
    return path

