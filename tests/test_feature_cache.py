"""Feature caching: computed once, reused, invalidated by any change, written atomically, exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import TINY, quick_trainer, tiny_digits
from tl_lightning.feature_cache import FeatureDataset, cached_features
from tl_lightning.modules import FeatureExtractionModule


class _CountingBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.proj(x.flatten(1))


def _dataset(n=10):
    return torch.utils.data.TensorDataset(torch.randn(n, 3, 8, 8), torch.arange(n) % 3)


def test_cache_hit_reuses_and_bounded_memmap(tmp_path):
    bb, ds = _CountingBackbone(), _dataset()
    first = cached_features(bb, ds, key="k", cache_dir=tmp_path, batch_size=4)
    calls = bb.calls
    second = cached_features(bb, ds, key="k", cache_dir=tmp_path, batch_size=4)
    assert bb.calls == calls == 3  # 10 items in batches of 4, and nothing on the hit
    assert isinstance(first.features, np.memmap)
    with torch.no_grad():
        expected = bb(ds.tensors[0])
    torch.testing.assert_close(second[7][0], expected[7])
    assert second[7][1] == 1


def test_killed_write_leaves_no_partial_cache(tmp_path, monkeypatch):
    bb, ds = _CountingBackbone(), _dataset()
    cached_features(bb, ds, key="good", cache_dir=tmp_path)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr("tl_lightning.feature_cache.np.save", dies)
    with pytest.raises(KeyboardInterrupt):
        cached_features(bb, ds, key="other", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]  # no 'other', no temp folder
    assert len(FeatureDataset(tmp_path / "good")) == 10


def _fit(tmp_path, cache: bool, **data_kwargs):
    torch.manual_seed(0)
    model = FeatureExtractionModule(
        num_classes=10, cache_features=cache, cache_dir=str(tmp_path / "cache"), **TINY
    )
    dm = tiny_digits(**data_kwargs)
    trainer = quick_trainer(
        tmp_path, max_epochs=2, limit_train_batches=None, limit_val_batches=None, deterministic=True
    )
    torch.manual_seed(1)
    trainer.fit(model, dm)
    return model, dm, trainer


def test_cached_training_equals_uncached_training(tmp_path):
    cached, dm, trainer = _fit(tmp_path, cache=True)
    assert isinstance(dm.train_set, FeatureDataset) and isinstance(dm.val_set, FeatureDataset)
    plain, plain_dm, plain_trainer = _fit(tmp_path, cache=False)
    assert not isinstance(plain_dm.train_set, FeatureDataset)
    for a, b in zip(cached.head.parameters(), plain.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert trainer.callback_metrics["val/acc"] == pytest.approx(
        plain_trainer.callback_metrics["val/acc"].item(), abs=1e-6
    )


def test_key_changes_recompute_and_same_key_reuses(tmp_path):
    _fit(tmp_path, cache=True)
    caches = {p.name for p in (tmp_path / "cache").iterdir()}
    assert len(caches) == 2  # train and val
    _fit(tmp_path, cache=True)
    assert {p.name for p in (tmp_path / "cache").iterdir()} == caches  # reused
    _fit(tmp_path, cache=True, image_size=24)  # other preprocessing -> new caches
    assert len({p.name for p in (tmp_path / "cache").iterdir()}) == 4


def test_augmentation_turns_caching_off(tmp_path):
    _, dm, _ = _fit(tmp_path, cache=True, augment="basic")
    assert not isinstance(dm.train_set, FeatureDataset)


@pytest.mark.parametrize(("cache_batch_size", "expected"), [(None, 8), (5, 5)])
def test_caching_runs_at_the_datamodules_batch_size_unless_told(
    tmp_path, cache_batch_size, expected
):
    model = FeatureExtractionModule(
        num_classes=10, cache_dir=str(tmp_path / "cache"), cache_batch_size=cache_batch_size, **TINY
    )
    sizes = []
    model.backbone.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1).fit(
        model, tiny_digits(batch_size=8)
    )
    assert max(sizes) == expected  # the caching passes (the other forward is the size probe)


def test_cache_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="cache_batch_size"):
        FeatureExtractionModule(num_classes=10, cache_batch_size=0, **TINY)
