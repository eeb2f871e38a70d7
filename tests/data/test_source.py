"""The source contract (LabelledImages) and the one transform rule datamodules apply to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from tests.helpers import TINY_DATA
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.data.source import LabelledImages


def small_images(n=6, size=32):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def test_subset_and_dataset_keep_items_and_labels_together():
    images = LabelledImages(small_images(), np.array([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    part = images.subset([4, 1])
    assert part.labels.tolist() == [1, 1] and torch.equal(part.items[0], images.items[4])
    ds = images.dataset([5, 0])
    assert [ds[i][1] for i in range(2)] == [2, 0] and torch.equal(ds[0][0], images.items[5])


def test_labels_must_be_class_ids():
    with pytest.raises(ValueError, match="class ids 0..1"):
        LabelledImages(small_images(2), np.array([0, 2]), ["a", "b"])
    with pytest.raises(ValueError, match="3 items but 2 labels"):
        LabelledImages(small_images(3), np.array([0, 1]), ["a", "b"])


def test_small_images_are_resized_whole_and_photos_cropped():
    dm = DigitsDataModule(**{**TINY_DATA, "image_size": 64})
    thumbs = LabelledImages(small_images(1), np.array([0]), ["a"], whole_image=True)
    _, eval_tf = dm.transforms_for(thumbs)
    cfg = dm.data_config
    expected = v2.Compose([
        v2.ToImage(), v2.Resize(64, antialias=True), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(cfg.mean), list(cfg.std)),
    ])(thumbs.items[0])  # fmt: skip
    torch.testing.assert_close(eval_tf(thumbs.items[0]), expected)  # no crop: every pixel kept
    at_size = LabelledImages(small_images(1, 64), np.array([0]), ["a"], whole_image=True)
    torch.testing.assert_close(
        dm.transforms_for(at_size)[1](at_size.items[0]),
        v2.Compose(list(expected_ops(cfg)))(at_size.items[0]),
    )
    photos = LabelledImages([], np.zeros(0, np.int64), ["a"])
    assert any(isinstance(t, v2.CenterCrop) for t in dm.transforms_for(photos)[1].transforms)


def expected_ops(cfg):
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(cfg.mean), list(cfg.std)),
    ]
