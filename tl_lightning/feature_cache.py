"""Frozen work done once: backbone features computed a single time, stored on disk, memory-mapped.

A frozen backbone with a deterministic input pipeline maps each image to the same features in
every epoch, so recomputing them (the seeds' loop) wastes almost all of a feature-extraction run.
:func:`cached_features` computes them once into a ``.npy`` memory map (bounded RAM: written batch by
batch, read page by page), keyed by everything that changes them, and returns a dataset of
``(feature, label)`` pairs the head trains on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tl_lightning.data.decode import is_failed, skip_failed_collate
from tl_lightning.errors import DataError
from tl_lightning.file_io import disk_full_error, is_disk_full

log = logging.getLogger(__name__)

CACHE_ENV = "TL_LIGHTNING_CACHE"
# Part of every cache key: bump it whenever a change to this file alters what a cache holds, so a
# run never reads a cache written by older code.
CACHE_FORMAT_VERSION = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "tl_lightning" / "features"))


class FeatureDataset(Dataset):
    """``(features[i], labels[i])`` read from a memory-mapped cache."""

    deterministic = True  # no random draws: SeededSamples reads it without per-sample RNG streams

    def __init__(self, folder: Path):
        self.folder = folder  # the cache's own folder (others may keep measurements beside it)
        self.features = np.load(folder / "features.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy")

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: np.ndarray) -> FeatureDataset:
        """Features held in memory (computed for this run only, not cached on disk)."""
        dataset = cls.__new__(cls)
        dataset.folder, dataset.features, dataset.labels = None, features, labels
        return dataset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return torch.from_numpy(np.array(self.features[index], dtype=np.float32)), int(
            self.labels[index]
        )

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch in one memmap read (the DataLoader's fetcher uses this when present)."""
        idx = np.asarray(indices)
        features = torch.from_numpy(np.array(self.features[idx], dtype=np.float32))
        return list(zip(features, self.labels[idx].tolist()))


def dataset_fingerprint(dataset: Dataset, transform_repr: str) -> str:
    """Cheap identity of a dataset: its type, length, transform, and a few decoded samples.

    Hashing every image would cost as much as caching it; the sampled items catch a changed
    folder, split or preprocessing, and the full key adds the backbone (see :func:`cache_key`).
    """
    h = hashlib.sha256(f"{type(dataset).__name__}|{len(dataset)}|{transform_repr}".encode())
    n = len(dataset)
    for i in sorted({0, n // 3, n // 2, (2 * n) // 3, n - 1}):
        item = dataset[i]
        if is_failed(item):  # an unreadable file still identifies the dataset
            h.update(repr(item).encode())
            continue
        x, y = item[0], item[1]
        h.update(torch.as_tensor(x).float().numpy().tobytes())
        h.update(str(int(y)).encode())
    return h.hexdigest()


def cache_key(**parts) -> str:
    """A short hash of everything that changes the cached features, plus the cache format version.

    Example:
        >>> cache_key(backbone="resnet18", data="abc") == cache_key(data="abc", backbone="resnet18")
        True
    """
    parts = {**parts, "cache_format": CACHE_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def reserve_space(path: Path) -> None:
    """Allocate the blocks of a (sparse) file up front, so a full disk raises ``ENOSPC`` here.

    Writing into a memory map whose pages have no disk blocks behind them kills the process with
    SIGBUS when the disk fills; ``posix_fallocate`` turns that into an ordinary ``OSError``.
    Platforms without it (macOS, Windows) keep the sparse file.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it (e.g. some NFS)
            return
        raise
    finally:
        os.close(fd)


@torch.inference_mode()
def _compute(
    backbone: nn.Module,
    dataset: Dataset,
    folder: Path,
    dtype: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    forward_context: Callable,
    desc: str,
) -> None:
    # Own generator: iterating a loader draws a seed, which must not shift the global RNG
    # (a run that fills the cache must train exactly like one that reads it).
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
        generator=generator,
        collate_fn=skip_failed_collate,  # an image that fails to decode is dropped, not fatal
    )
    features = labels = None
    start = 0
    for batch in tqdm(loader, desc=desc, unit="batch", leave=False):
        if not batch:  # every image of this batch failed
            continue
        x, y = batch[0].to(device), batch[1]
        with forward_context():
            out = backbone(x).float().cpu().numpy()
        if features is None:
            features = np.lib.format.open_memmap(
                folder / "features.npy", mode="w+", dtype=dtype, shape=(len(dataset), out.shape[1])
            )
            labels = np.empty(len(dataset), dtype=np.int64)
            reserve_space(folder / "features.npy")
        features[start : start + len(out)] = out
        labels[start : start + len(out)] = y.numpy()
        start += len(out)
    if features is None:
        raise DataError(
            f"every one of the {len(dataset)} images failed to load while caching features; "
            "check the dataset folder (see the skipped-images report)"
        )
    features.flush()
    np.save(
        folder / "labels.npy", labels[:start]
    )  # FeatureDataset's length: the images that loaded
    del features


def cached_features(
    backbone: nn.Module,
    dataset: Dataset,
    key: str,
    cache_dir: str | Path | None = None,
    dtype: str = "float32",
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    forward_context: Callable | None = None,
    desc: str = "caching features",
) -> FeatureDataset:
    """The cached features of ``dataset`` under ``key``, computing them first if absent.

    The cache is written to a temporary folder and renamed into place, so a run killed while
    caching leaves either the previous good cache or none, never a partial one.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"cache dtype must be 'float32' or 'float16', got '{dtype}'")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    final = root / key
    if (final / "labels.npy").is_file():
        log.info("feature cache hit: %s", final)
        return FeatureDataset(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        was_training = backbone.training
        backbone.eval()
        _compute(
            backbone,
            dataset,
            tmp,
            dtype,
            batch_size,
            num_workers,
            torch.device(device),
            forward_context or _null_context,
            desc,
        )
        backbone.train(was_training)
        (tmp / "meta.json").write_text(json.dumps({"key": key, "n": len(dataset), "dtype": dtype}))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(final, e, "feature cache") from e
        raise
    log.info("feature cache written: %s", final)
    return FeatureDataset(final)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
