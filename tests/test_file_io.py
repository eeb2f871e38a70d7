"""File I/O safety: one disk-full test (ENOSPC and quota EDQUOT) used by every writer."""

from __future__ import annotations

import errno

import pytest

from tl_lightning.data.decode import load_rgb
from tl_lightning.data.scan import scan_image_folder
from tl_lightning.file_io import DiskFullError, atomic_write, atomic_write_text, is_disk_full


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_or_quota_is_a_disk_full_error_naming_the_file(tmp_path, code):
    target = tmp_path / "out.txt"
    target.write_text("previous")

    def fill(f):
        f.write(b"partial")
        raise OSError(code, "no space")

    with pytest.raises(DiskFullError, match="out.txt"):
        atomic_write(target, fill)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left


def test_other_errors_are_not_disk_full():
    assert is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert not is_disk_full(OSError(errno.EACCES, "denied"))
    assert not is_disk_full(ValueError("no errno"))


def test_text_writes_are_atomic_and_keep_newlines(tmp_path):
    path = atomic_write_text(tmp_path / "a.csv", lambda f: f.write("x,y\r\n1,2\r\n"))
    assert path.read_bytes() == b"x,y\r\n1,2\r\n"


def test_scan_writes_its_cache_through_atomic_write(tmp_path, monkeypatch):
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "1.png")
    written = []
    real = atomic_write

    def spy(path, write, what="file"):
        written.append(path.name)
        return real(path, write, what)

    monkeypatch.setattr("tl_lightning.file_io.atomic_write", spy)
    scan = scan_image_folder(tmp_path, load_rgb, progress=False)
    assert len(scan.valid) == 2
    assert written == ["manifest.csv", "skipped.csv", "scan.json"]  # scan.json last: complete
