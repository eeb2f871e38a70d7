"""Shared fixtures: tiny offline images and a quiet Lightning."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# Under pytest-xdist the workers share the cores: each gets its share of threads, and so do the
# CLI/DDP children it starts (they read OMP_NUM_THREADS), instead of every process using them all.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_feature_cache(tmp_path_factory, monkeypatch):
    """Every test caches features in its own temporary folder, never in ``~/.cache``.

    Without this, random-init backbones (a new key each run) grow the user's cache on every run,
    and a test could pass by reading a cache an earlier test (or older code) wrote.
    """
    from tl_lightning.feature_cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("feature_cache")))
    yield


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    yield


@pytest.fixture
def tiny_batch() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny convolutions on a shared 2-core CPU only add contention with a second thread, and runs
    compared bit for bit need one float reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
