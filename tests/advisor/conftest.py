"""A tiny labelled folder in the real on-disk format, with its sizes and broken files recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SIZES = [(20, 16), (24, 24), (32, 20)]


@dataclass
class Folder:
    root: Path
    sizes: dict[str, tuple[int, int]]  # file path -> (width, height) for every valid image
    broken: list[str]  # paths of files that are not images


def make_folder(root: Path, per_class: dict[str, int], broken: dict[str, int]) -> Folder:
    rng = np.random.default_rng(0)
    sizes, bad = {}, []
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = SIZES[(i + len(cls)) % len(SIZES)]
            path = root / cls / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
            sizes[str(path)] = (w, h)
    for cls, n in broken.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / cls / f"broken{i}.jpg"
            path.write_bytes(b"\xff\xd8\xff not really a jpeg")
            bad.append(str(path))
    return Folder(root, sizes, bad)


@pytest.fixture
def folder(tmp_path) -> Folder:
    return make_folder(tmp_path / "images", {"ant": 9, "bee": 7, "cat": 12}, {"bee": 2})


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
