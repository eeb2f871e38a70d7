"""Shared fixtures: tiny offline images and a quiet Lightning."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _quiet_lightning():
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    yield


@pytest.fixture
def tiny_batch() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)
