"""Verified, atomic, resumable downloads and safe extraction, against a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
import zipfile

import pytest

from tl_lightning.data.download import check_archive, download_url, extract_archive, file_hash
from tl_lightning.errors import DataError, UnsafeFileError

PAYLOAD = random.Random(0).randbytes(300_000)  # fixed: test ids hold the checksum (xdist compares them)
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("checksum", "algorithm"), [(MD5, "md5"), (SHA256, "sha256"), (None, "md5")]
)
def test_download_verifies_and_renames(loopback, tmp_path, checksum, algorithm):
    url = loopback.add("blob.bin", PAYLOAD)
    path = download_url(url, tmp_path / "sub" / "blob.bin", checksum, algorithm, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert leftovers(tmp_path / "sub") == ["blob.bin"]  # no .part left behind


def test_verified_file_is_not_downloaded_again(loopback, tmp_path):
    url = loopback.add("blob.bin", PAYLOAD)
    (tmp_path / "blob.bin").write_bytes(PAYLOAD)
    download_url(url, tmp_path / "blob.bin", MD5, progress=False)
    assert loopback.requests == []


def test_existing_file_with_wrong_checksum_is_replaced(loopback, tmp_path):
    url = loopback.add("blob.bin", PAYLOAD)
    (tmp_path / "blob.bin").write_bytes(b"stale")
    download_url(url, tmp_path / "blob.bin", MD5, progress=False)
    assert (tmp_path / "blob.bin").read_bytes() == PAYLOAD


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(loopback, tmp_path):
    url = loopback.add("blob.bin", PAYLOAD)
    wrong = "0" * 32
    with pytest.raises(DataError, match=f"md5 .* is {MD5}, expected {wrong}"):
        download_url(url, tmp_path / "blob.bin", wrong, progress=False)
    assert leftovers(tmp_path) == []


def test_interrupted_download_is_resumed_with_range(loopback, tmp_path):
    url = loopback.add("blob.bin", PAYLOAD)
    loopback.cuts["blob.bin"] = 1  # first response stops halfway through the promised body
    path = download_url(url, tmp_path / "blob.bin", SHA256, "sha256", progress=False)
    assert path.read_bytes() == PAYLOAD
    assert len(loopback.requests) == 2
    assert loopback.requests[1][1] == f"bytes={len(PAYLOAD) // 2}-"  # resumed, not restarted
    assert leftovers(tmp_path) == ["blob.bin"]


def test_interrupted_download_restarts_when_server_ignores_range(loopback, tmp_path):
    url = loopback.add("blob.bin", PAYLOAD)
    loopback.ranges = False
    loopback.cuts["blob.bin"] = 2
    path = download_url(url, tmp_path / "blob.bin", MD5, progress=False, retries=3)
    assert (
        path.read_bytes() == PAYLOAD
    )  # 200 after a Range request: the .part is rewritten, not appended
    assert len(loopback.requests) == 3


def test_download_that_keeps_failing_is_reported_and_never_kept(loopback, tmp_path):
    url = loopback.add("blob.bin", PAYLOAD)
    loopback.ranges = False
    loopback.cuts["blob.bin"] = 99
    with pytest.raises(DataError, match="after 2 attempts"):
        download_url(
            url, tmp_path / "blob.bin", None, retries=2, progress=False
        )  # no checksum: size check alone
    assert leftovers(tmp_path) == []


def test_missing_file_fails_fast(loopback, tmp_path):
    with pytest.raises(DataError, match="HTTP 404"):
        download_url(loopback.url("nope.zip"), tmp_path / "nope.zip", progress=False)
    assert len(loopback.requests) == 1  # a 404 is not retried
    assert leftovers(tmp_path) == []


def test_unknown_algorithm(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="sha1"):
        file_hash(tmp_path / "f", "sha1")


# --- archives --------------------------------------------------------------------------------


def make_zip(path, members: dict[str, bytes], symlink: str | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16) | 0  # a symlink in the unix mode bits
            zf.writestr(info, "/etc/passwd")
    return path


def make_tar(path, members: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def test_extract_zip_and_tar(tmp_path):
    members = {"top/a.txt": b"a", "top/sub/b.txt": b"b"}
    for archive in (
        make_zip(tmp_path / "x.zip", members),
        make_tar(tmp_path / "x.tar.gz", members),
    ):
        dest = tmp_path / f"out-{archive.suffix}"
        extract_archive(archive, dest)
        assert (dest / "top" / "sub" / "b.txt").read_bytes() == b"b"
        assert leftovers(dest) == ["top"]  # the temporary extraction folder is gone


@pytest.mark.parametrize(
    "name", ["../evil.txt", "ok/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"]
)
def test_zip_path_traversal_is_refused(tmp_path, name):
    archive = make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok", name: b"pwned"})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeFileError, match="outside the extraction folder"):
        extract_archive(archive, dest)
    assert not dest.exists()  # checked before anything is written
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bad.zip", {"fine.txt": b"ok"}, symlink="link")
    with pytest.raises(UnsafeFileError, match="symlink"):
        check_archive(archive)


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt"])
def test_tar_path_traversal_is_refused(tmp_path, name):
    archive = make_tar(tmp_path / "bad.tar.gz", {"fine.txt": b"ok", name: b"pwned"})
    with pytest.raises(UnsafeFileError, match="outside the extraction folder"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_links_are_refused(tmp_path, kind):
    archive = make_tar(
        tmp_path / "bad.tar.gz", {"fine.txt": b"ok"}, {"inner": (kind, "/etc/passwd")}
    )
    with pytest.raises(UnsafeFileError, match="link member 'inner'"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_an_archive(tmp_path):
    (tmp_path / "x.zip").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        extract_archive(tmp_path / "x.zip", tmp_path / "out")


def _old_python_extract(monkeypatch):
    """Make TarFile.extract behave like Python 3.10.0-3.10.11 / 3.11.0-3.11.3 (no ``filter=``)."""
    real = tarfile.TarFile.extract
    calls = []

    def extract(self, member, path="", set_attrs=True, *, numeric_owner=False, **kwargs):
        if "filter" in kwargs:
            raise TypeError("extract() got an unexpected keyword argument 'filter'")
        calls.append(member.name)
        return real(self, member, path, set_attrs, numeric_owner=numeric_owner)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract)
    return calls


def test_tar_without_filter_argument_falls_back_to_our_member_checks(tmp_path, monkeypatch):
    calls = _old_python_extract(monkeypatch)
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("top/run.sh")
        info.size, info.mode = 2, 0o6777  # setuid + setgid + world-writable
        tf.addfile(info, io.BytesIO(b"hi"))
    extract_archive(path, tmp_path / "out")
    extracted = tmp_path / "out" / "top" / "run.sh"
    assert calls == ["top/run.sh"] and extracted.read_bytes() == b"hi"
    assert extracted.stat().st_mode & 0o7777 == 0o755  # what the "data" filter would keep
    # the guard still holds where the stdlib filter is missing: escaping members never land
    bad = make_tar(tmp_path / "bad.tar.gz", {"../evil.txt": b"x"})
    with pytest.raises(UnsafeFileError, match="outside the extraction"):
        extract_archive(bad, tmp_path / "out2")
    assert not (tmp_path / "evil.txt").exists() and calls == ["top/run.sh"]
