"""Feature-cache keys and disk safety: test isolation, a format version in every key, space reserved up front."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from tl_lightning import feature_cache
from tl_lightning.feature_cache import (
    CACHE_ENV,
    CACHE_FORMAT_VERSION,
    cache_key,
    cached_features,
    default_cache_dir,
)
from tl_lightning.file_io import DiskFullError


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 5)

    def forward(self, x):
        return self.proj(x.flatten(1))


def _dataset(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 4, 4, generator=g), torch.arange(n) % 2)


def test_tests_cache_into_a_temporary_folder_not_home():
    folder = default_cache_dir()
    assert os.environ[CACHE_ENV] == str(folder)
    assert not folder.is_relative_to(Path.home() / ".cache")
    assert folder.is_dir() and not any(folder.iterdir())  # fresh for this test


def test_key_is_the_hash_of_the_parts_and_the_format_version():
    parts = {"backbone": "resnet18", "data": "d1", "dtype": "float32"}
    # independent: the documented recipe, sha256 of the sorted JSON of parts + version, 24 hex digits
    payload = json.dumps({**parts, "cache_format": CACHE_FORMAT_VERSION}, sort_keys=True)
    assert cache_key(**parts) == hashlib.sha256(payload.encode()).hexdigest()[:24]
    without_version = json.dumps(parts, sort_keys=True)
    assert cache_key(**parts) != hashlib.sha256(without_version.encode()).hexdigest()[:24]
    # every part matters
    for name in parts:
        assert cache_key(**{**parts, name: "other"}) != cache_key(**parts)


def test_a_new_format_version_never_reads_an_old_cache(tmp_path, monkeypatch):
    bb, ds = _Linear(), _dataset()
    old_key = cache_key(backbone="b", data="d")
    cached_features(bb, ds, key=old_key, cache_dir=tmp_path)
    monkeypatch.setattr(feature_cache, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    new_key = cache_key(backbone="b", data="d")
    assert new_key != old_key
    cached_features(bb, ds, key=new_key, cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([old_key, new_key])


def test_space_is_reserved_before_the_memmap_is_written(tmp_path, monkeypatch):
    calls = []
    real = os.posix_fallocate

    def spy(fd, offset, length):
        calls.append((offset, length, os.fstat(fd).st_size))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    ds = cached_features(_Linear(), _dataset(6), key="k", cache_dir=tmp_path)
    assert len(calls) == 1
    offset, length, size = calls[0]
    # the whole file: npy header + 6 x 5 float32, reserved before any feature was written
    assert offset == 0 and length == size == (tmp_path / "k" / "features.npy").stat().st_size
    assert length >= 6 * 5 * 4
    st = (tmp_path / "k" / "features.npy").stat()
    assert st.st_blocks * 512 >= 6 * 5 * 4  # real blocks, not a sparse file
    assert len(ds) == 6


def test_full_disk_during_reservation_raises_disk_full_and_leaves_nothing(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match="feature cache") as info:
        cached_features(_Linear(), _dataset(), key="k", cache_dir=tmp_path)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no cache, no temporary folder


def test_filesystem_without_fallocate_keeps_working(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    ds = cached_features(_Linear(), _dataset(), key="k", cache_dir=tmp_path)
    assert len(ds) == 6
