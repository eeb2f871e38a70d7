"""FeatureExtractionModule's cache key: every input that changes the features (weights, precision, layer, dtype, data) changes it."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
from torch.utils.data import TensorDataset

from tl_lightning.modules.feature_extraction import FeatureExtractionModule


def _images(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(6, 3, 16, 16, generator=g), torch.arange(6) % 2)


def _key(tmp_path, seed=0, precision="32-true", data_seed=0, **kw) -> str:
    """The cache folder one module writes for one dataset, under a minimal stand-in trainer."""
    torch.manual_seed(seed)
    model = FeatureExtractionModule(
        num_classes=2,
        backbone="resnet18",
        weights=None,
        cache_dir=str(tmp_path),
        channels_last=False,
        **kw,
    )
    model._trainer = SimpleNamespace(
        precision=precision,
        datamodule=SimpleNamespace(batch_size=4),
        strategy=SimpleNamespace(root_device=torch.device("cpu"), barrier=lambda name: None),
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        is_global_zero=True,
    )
    before = {p.name for p in tmp_path.iterdir()} if tmp_path.exists() else set()
    model._cache(_images(data_seed), "train_set")
    after = {p.name for p in tmp_path.iterdir()}
    new = after - before
    return new.pop() if new else "reused"


def test_the_same_inputs_reuse_the_cache(tmp_path):
    assert _key(tmp_path) != "reused"
    assert _key(tmp_path) == "reused"


def test_each_input_that_changes_the_features_gets_its_own_cache(tmp_path):
    base = _key(tmp_path)
    variants = {
        "weights": _key(tmp_path, seed=1),
        "precision": _key(tmp_path, precision="bf16-mixed"),
        "dtype": _key(tmp_path, cache_dtype="float16"),
        "layer": _key(tmp_path, layer="layer3"),
        "data": _key(tmp_path, data_seed=1),
    }
    for part, key in variants.items():
        assert key != "reused", f"a change of {part} reused the old cache"
    assert len({base, *variants.values()}) == 6
