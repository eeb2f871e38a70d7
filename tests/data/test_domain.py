"""Digits-M (MNIST-M-style target) and the source + target DomainAdaptationDataModule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
from tl_lightning.data.digits import load_digits_images
from tl_lightning.data.digits_m import DigitsMDataModule, blend_with_photos, domain_part, load_photo
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.errors import DataError

DIGITS_M = "tl_lightning.data.digits_m.DigitsMDataModule"


def pair(**kwargs) -> DomainAdaptationDataModule:
    args = dict(
        source={"class_path": DIGITS_M, "init_args": {"part": "source", "blend": False}},
        target={"class_path": DIGITS_M, "init_args": {"part": "target"}},
        backbone="dann_cnn",
        weights=None,
        image_size=16,
        batch_size=16,
    )
    return DomainAdaptationDataModule(**{**args, **kwargs})


# --- digits-M ------------------------------------------------------------------------------------
def test_blend_is_abs_difference_of_a_photo_patch_and_the_digit_per_channel():
    gen = torch.Generator().manual_seed(0)
    digits = torch.randint(0, 256, (20, 3, 16, 16), generator=gen, dtype=torch.uint8)
    patches = blend_with_photos(torch.zeros_like(digits), seed=3)  # |patch - 0| = the patch itself
    blended = blend_with_photos(digits, seed=3)
    expected = (patches.to(torch.int16) - digits.to(torch.int16)).abs().to(torch.uint8)
    assert torch.equal(blended, expected)
    assert blended.dtype == torch.uint8 and blended.shape == digits.shape


def test_patches_come_from_the_named_photo():
    photo = torch.from_numpy(load_photo("coffee")).permute(2, 0, 1)  # [3, H, W], channel order kept
    zeros = torch.zeros(5, 3, 12, 12, dtype=torch.uint8)
    patches = blend_with_photos(zeros, seed=0, photos=["coffee"])
    h, w = photo.shape[1] - 11, photo.shape[2] - 11
    for patch in patches:
        # candidate corners match the patch's top-left pixel; one of them must match all of it
        corners = (photo[:, :h, :w] == patch[:, :1, :1]).all(dim=0).nonzero().tolist()
        assert any(torch.equal(photo[:, r : r + 12, c : c + 12], patch) for r, c in corners)


def test_blend_is_deterministic_from_the_seed():
    digits, _ = load_digits_images(16)
    digits = digits[:50]
    assert torch.equal(blend_with_photos(digits, seed=7), blend_with_photos(digits, seed=7))
    assert not torch.equal(blend_with_photos(digits, seed=7), blend_with_photos(digits, seed=8))


def test_bad_photo_names_and_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="unknown scikit-image photo 'nope'"):
        load_photo("nope")
    with pytest.raises(ValueError, match="not a uint8 photo"):
        load_photo("horse")  # a boolean silhouette
    with pytest.raises(ValueError, match="smaller than image_size"):
        blend_with_photos(
            torch.zeros(1, 3, 200, 200, dtype=torch.uint8), seed=0, photos=["microaneurysms"]
        )
    with pytest.raises(ValueError, match="unknown part"):
        DigitsMDataModule(backbone="dann_cnn", weights=None, part="left")


def test_source_and_target_halves_are_disjoint_stratified_and_cover_the_digits():
    _, labels = load_digits_images(8)
    source, target = domain_part(labels, "source"), domain_part(labels, "target")
    assert not set(source) & set(target)
    assert len(source) + len(target) == len(labels)
    assert np.abs(np.bincount(labels[source]) - np.bincount(labels[target])).max() <= 1


def test_digits_m_datamodule_builds_each_half_from_its_own_images():
    digits, labels = load_digits_images(16)
    plain = DigitsMDataModule(
        backbone="dann_cnn", weights=None, image_size=16, part="source", blend=False
    )
    plain._prepare()
    assert torch.equal(plain._images, digits[domain_part(labels, "source")])
    blended = DigitsMDataModule(backbone="dann_cnn", weights=None, image_size=16, part="target")
    blended._prepare()
    target_idx = domain_part(labels, "target")
    assert torch.equal(blended._images, blend_with_photos(digits, 0)[target_idx])
    assert np.array_equal(blended._labels, labels[target_idx])
    blended.setup("fit")
    x, y = blended.train_set[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1.0 <= x.min() <= x.max() <= 1.0


# --- DomainAdaptationDataModule ------------------------------------------------------------------
def test_train_batches_pair_labelled_source_with_unlabelled_target():
    dm = pair()
    dm.setup("fit")
    # iterating a CombinedLoader yields (batch, batch_idx, dataloader_idx)
    batch, _, _ = next(iter(dm.train_dataloader()))
    xs, ys = batch["source"]
    assert xs.shape == (16, 3, 16, 16) and ys.shape == (16,) and ys.dtype == torch.long
    assert isinstance(batch["target"], torch.Tensor), (
        "target labels must be dropped before training"
    )
    assert batch["target"].shape == (16, 3, 16, 16)


def test_poisoned_target_labels_are_dropped_from_training_batches():
    class Poisoned(DigitsMDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set.labels = np.full(len(self.train_set.labels), 10**6)

    dm = DomainAdaptationDataModule(
        source={"class_path": DIGITS_M, "init_args": {"part": "source", "blend": False}},
        target=Poisoned(backbone="dann_cnn", weights=None, image_size=16, batch_size=16),
        backbone="dann_cnn",
        weights=None,
        image_size=16,
        batch_size=16,
    )
    dm.setup("fit")
    for batch, _, _ in dm.train_dataloader():
        assert isinstance(batch["target"], torch.Tensor)
        assert batch["target"].dtype == torch.float32 and batch["target"].shape[1:] == (3, 16, 16)


def test_max_size_cycle_cycles_the_shorter_domain():
    dm = pair(
        target={"class_path": DIGITS_M, "init_args": {"part": "target", "split": [0.2, 0.4, 0.4]}}
    )
    dm.setup("fit")
    source_batches = len(dm.source.train_dataloader())
    target_batches = len(dm.train_dataloader().flattened[1])
    assert target_batches < source_batches
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == source_batches
    assert all(b["target"].shape[0] > 0 for b in batches)


def test_backbone_preprocessing_and_shared_args_are_passed_down():
    dm = pair()
    for side in (dm.source, dm.target):
        assert side.hparams.backbone == "dann_cnn" and side.hparams.weights is None
        assert side.image_size == 16 and side.batch_size == 16
        assert side.data_config.mean == (0.5, 0.5, 0.5)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    assert sum(dm.class_counts()) == len(dm.source.train_labels())


def test_val_is_source_then_target_and_test_is_target_test():
    dm = pair()
    dm.setup("fit")
    dm.setup("test")
    val = dm.val_dataloader()
    assert [loader.dataset for loader in val] == [dm.source.val_set, dm.target.val_set]
    assert dm.test_dataloader().dataset is dm.target.test_set


def test_class_mismatch_and_label_using_target_options_are_refused():
    with pytest.raises(ValueError, match="sampler"):
        pair(
            target={"class_path": DIGITS_M, "init_args": {"part": "target", "sampler": "weighted"}}
        )
    with pytest.raises(ValueError, match="mixup_alpha"):
        pair(target={"class_path": DIGITS_M, "init_args": {"part": "target", "mixup_alpha": 0.2}})
    with pytest.raises(ValueError, match="cannot be imported"):
        pair(source={"class_path": "tl_lightning.data.nope.Nope"})
    with pytest.raises(ValueError, match="class_path"):
        pair(source="digits")

    class Letters(DigitsMDataModule):
        @property
        def class_names(self):
            return list("abcdefghij")

    with pytest.raises(DataError, match="one label space"):
        pair(target=Letters(backbone="dann_cnn", weights=None, image_size=16))


def test_prebuilt_datamodule_must_share_the_backbone():
    other = DigitsMDataModule(backbone="efficientnet_lite0", weights="DEFAULT", image_size=16)
    with pytest.raises(ValueError, match="backbone='efficientnet_lite0'"):
        pair(target=other)
