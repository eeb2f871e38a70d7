"""Verified downloads and safe archive extraction.

A download goes to ``<file>.part`` (resumed with an HTTP Range request when the server allows it,
retried otherwise), is checked against the expected size and checksum, and only then renamed to
its final name: a failed or wrong download never leaves a file that looks complete. Archives are
checked member by member before anything is written, and extracted through a temporary folder.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from tl_lightning.errors import DataError, UnsafeFileError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ALGORITHMS = ("md5", "sha256")


class IncompleteDownload(OSError):
    """The server closed the connection before sending the whole body (retried by download_url)."""


def file_hash(path: str | Path, algorithm: str = "md5") -> str:
    """Hex digest of a file, read in chunks."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm '{algorithm}'; valid: {list(ALGORITHMS)}")
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: str | Path, checksum: str | None, algorithm: str = "md5") -> bool:
    """True when ``path`` exists and matches ``checksum`` (any existing file when checksum is None)."""
    path = Path(path)
    if not path.is_file():
        return False
    return checksum is None or file_hash(path, algorithm) == checksum.lower()


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: append to ``part`` from where it stops (Range) or restart it; check the size."""
    have = part.stat().st_size if part.exists() else 0
    headers = (
        {"User-Agent": "tl-lightning", "Range": f"bytes={have}-"}
        if have
        else {"User-Agent": "tl-lightning"}
    )
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range past the end: the .part is stale, start over
            part.unlink()
            return _fetch(url, part, timeout, progress)
        raise
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0  # server ignored the Range header: restart from byte 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        got = have
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(
                total=expected,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while True:
                try:
                    chunk = response.read(CHUNK)
                except http.client.IncompleteRead as e:  # chunked transfer cut short
                    out.write(e.partial)
                    raise IncompleteDownload(
                        f"connection closed after {got + len(e.partial)} bytes"
                    ) from e
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    # http.client returns EOF silently when a Content-Length body is cut short: count ourselves
    if expected is not None and got < expected:
        raise IncompleteDownload(f"connection closed after {got} of {expected} bytes")


def download_url(
    url: str,
    path: str | Path,
    checksum: str | None = None,
    algorithm: str = "md5",
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``path``, verified and atomically; a verified existing file is kept.

    Interrupted transfers are resumed (HTTP Range) or restarted up to ``retries`` times; the
    checksum (``md5`` or ``sha256``) is checked before the file gets its final name. On failure
    nothing is left at ``path``, and no partial file stays behind after a checksum mismatch.

    Example:
        >>> download_url("https://example.org/a.zip", "data/a.zip", "9e10...", "sha256")  # doctest: +SKIP
    """
    path = Path(path)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown checksum algorithm '{algorithm}'; valid: {list(ALGORITHMS)}")
    if check_file(path, checksum, algorithm):
        return path
    if path.exists():
        log.warning("%s exists but its %s does not match; downloading it again", path, algorithm)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            _fetch(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as e:
            permanent = 400 <= e.code < 500 and e.code not in (
                408,
                429,
            )  # timeout/rate limit: retry
            if permanent:  # a client error (404, 403...) will not fix itself
                part.unlink(missing_ok=True)
                raise DataError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
            last_error = e
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, cut bodies
            last_error = e
        log.warning("download of %s failed (attempt %d/%d): %s", url, attempt, retries, last_error)
        if attempt < retries:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 10.0))
    else:
        part.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} after {retries} attempts ({last_error}); nothing was kept. "
            f"Check the network and retry, or download it by hand to {path}"
        ) from last_error
    if checksum is not None:
        actual = file_hash(part, algorithm)
        if actual != checksum.lower():
            part.unlink()
            raise DataError(
                f"{algorithm} of the file downloaded from {url} is {actual}, expected {checksum}; "
                f"the download was deleted. The server may have changed the file, or the transfer "
                f"was corrupted: retry, or fetch it by hand to {path} and check it"
            )
    os.replace(part, path)
    return path


# --- archives --------------------------------------------------------------------------------


def _check_member_name(name: str, archive: Path) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or (pure.parts and pure.parts[0].endswith(":")) or ".." in pure.parts:
        raise UnsafeFileError(
            f"archive {archive} has a member '{name}' that would land outside the extraction "
            f"folder; refusing to extract it (the file may be malicious: delete it and re-download)"
        )


def _zip_is_link(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return (mode & 0o170000) == 0o120000


def check_archive(archive: str | Path) -> list[str]:
    """Member names of a zip or tar archive, after refusing any that escape the target folder.

    Refused: absolute paths, ``..`` components, symlinks, hardlinks and device files.
    """
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = []
            for info in zf.infolist():
                _check_member_name(info.filename, archive)
                if _zip_is_link(info):
                    raise UnsafeFileError(
                        f"archive {archive} has a symlink member '{info.filename}'; refusing to extract it"
                    )
                names.append(info.filename)
            return names
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            names = []
            for member in tf.getmembers():
                _check_member_name(member.name, archive)
                if member.issym() or member.islnk():
                    raise UnsafeFileError(
                        f"archive {archive} has a link member '{member.name}' -> '{member.linkname}'; refusing to extract it"
                    )
                if not (member.isfile() or member.isdir()):
                    raise UnsafeFileError(
                        f"archive {archive} has a special member '{member.name}' (device or fifo); refusing to extract it"
                    )
                names.append(member.name)
            return names
    raise DataError(
        f"{archive} is neither a zip nor a tar archive; delete it and download it again"
    )


def _extract_tar_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    """Extract one (already checked) tar member with the stdlib's ``"data"`` filter when it has one.

    ``filter=`` (PEP 706) is missing on Python 3.10.0-3.10.11 and 3.11.0-3.11.3, where it raises
    ``TypeError``; there :func:`check_archive` (run before any member is written: no absolute
    or ``..`` names, links or devices) is the guard, and the mode loses what the data filter
    strips (setuid/setgid/sticky bits, group/other write).
    """
    try:
        tf.extract(member, dest, filter="data")  # belt and braces over check_archive
    except TypeError as e:
        if "filter" not in str(e):
            raise
        member = copy.copy(member)
        member.mode &= 0o755
        tf.extract(member, dest)


def extract_archive(archive: str | Path, dest: str | Path) -> Path:
    """Extract a zip or tar(.gz) archive into ``dest`` safely; returns ``dest``.

    Every member is checked first (see :func:`check_archive`); members are extracted into a
    temporary folder inside ``dest`` and moved into place only when all of them were written, so
    an interrupted extraction leaves no half-extracted tree under its final name.
    """
    archive, dest = Path(archive), Path(dest)
    check_archive(archive)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for info in tqdm(members, desc=f"extract {archive.name}", unit="file", leave=False):
                    zf.extract(info, tmp)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for member in tqdm(
                    members, desc=f"extract {archive.name}", unit="file", leave=False
                ):
                    _extract_tar_member(tf, member, tmp)
        for item in tmp.iterdir():
            target = dest / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
