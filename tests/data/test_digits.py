"""The offline digits datamodule: real images, stratified seeded splits, backbone preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_lightning.data import DigitsDataModule, stratified_split


def test_split_is_stratified_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(5), [40, 30, 20, 20, 10])
    parts = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined)) == len(labels)
    for part, frac in zip(parts, (0.6, 0.2, 0.2)):
        counts = np.bincount(labels[part], minlength=5)
        assert np.allclose(counts, frac * np.bincount(labels), atol=1)
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], stratified_split(labels, (0.6, 0.2, 0.2), seed=1)[0])
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.2), seed=0)


def test_digits_batches_use_the_backbone_normalisation():
    dm = DigitsDataModule(backbone="efficientnet_lite0", image_size=32, batch_size=16)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    # mean/std 0.5: pixels in [0, 1] map to [-1, 1]; background (0) is exactly -1
    assert x.min() == pytest.approx(-1.0) and x.max() <= 1.0 + 1e-6
    assert torch.equal(x[:, 0], x[:, 1])  # grey copied to 3 channels
    assert dm.num_classes == 10 and sum(dm.class_counts()) == len(dm.train_set)


def test_fixed_size_backbones_refuse_other_sizes():
    with pytest.raises(ValueError, match="only takes 224px"):
        DigitsDataModule(backbone="vit_b_16", weights=None, image_size=64)


def test_weighted_sampler_balances_classes():
    dm = DigitsDataModule(
        backbone="resnet18", weights=None, image_size=8, sampler="weighted", batch_size=256
    )
    dm.setup("fit")
    keep = np.concatenate(
        [np.where(dm.train_set.labels == c)[0][: 5 if c == 0 else 100] for c in range(10)]
    )
    dm.train_set.images, dm.train_set.labels = dm.train_set.images[keep], dm.train_set.labels[keep]
    dm.train_labels = lambda: dm.train_set.labels
    drawn = torch.cat([y for _, y in dm.train_dataloader()])
    share_of_rare = (drawn == 0).float().mean().item()
    assert 0.05 < share_of_rare < 0.15  # ~1/10 despite being 5 of 905 samples
