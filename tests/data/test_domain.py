"""Digits-M (MNIST-M-style target) and the source + target DomainAdaptationDataModule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
from tl_lightning.data.digits import load_digits_images
from tl_lightning.data.digits_m import (
    DEFAULT_PHOTOS,
    DigitsMDataModule,
    DigitsMSource,
    blend_with_photos,
    domain_part,
    load_photo,
)
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.data.split import stratified_split
from tl_lightning.errors import DataError


def pair(**kwargs) -> DomainAdaptationDataModule:
    args = dict(
        source=DigitsMSource(part="source", blend=False),
        target=DigitsMSource(part="target"),
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
    assert torch.equal(plain.load_images().items, digits[domain_part(labels, "source")])
    blended = DigitsMDataModule(backbone="dann_cnn", weights=None, image_size=16, part="target")
    target_idx = domain_part(labels, "target")
    assert torch.equal(blended.load_images().items, blend_with_photos(digits, 0)[target_idx])
    assert np.array_equal(blended.load_images().labels, labels[target_idx])
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
    dm = pair()
    dm.setup("fit")
    target_train = dm.sets["target"]["train"]
    target_train.labels = np.full(len(target_train.labels), 10**6)
    for batch, _, _ in dm.train_dataloader():
        assert isinstance(batch["target"], torch.Tensor)
        assert batch["target"].dtype == torch.float32 and batch["target"].shape[1:] == (3, 16, 16)


def test_max_size_cycle_cycles_the_shorter_domain():
    dm = pair(target=DigitsMSource(part="target", split=[0.2, 0.4, 0.4]))
    dm.setup("fit")
    loaders = dm.train_dataloader().flattened
    source_batches, target_batches = len(loaders[0]), len(loaders[1])
    assert target_batches < source_batches
    batches = [batch for batch, _, _ in dm.train_dataloader()]
    assert len(batches) == source_batches
    assert all(b["target"].shape[0] > 0 for b in batches)


def test_each_side_is_its_source_split_like_the_digits_m_datamodule():
    """The same images and splits the two DigitsMDataModules gave before the pair composed sources."""
    digits, labels = load_digits_images(16)
    dm = pair()
    dm.setup("fit")
    dm.setup("test")
    blended = blend_with_photos(digits, 0)
    for role, images in (("source", digits), ("target", blended)):
        half = domain_part(labels, role)
        parts = stratified_split(labels[half], (0.6, 0.2, 0.2), seed=0)  # the datamodules' split
        for split, idx in zip(("train", "val", "test"), parts, strict=True):
            dataset = dm.sets[role][split]
            assert torch.equal(dataset.items, images[half][idx]), (role, split)
            assert np.array_equal(dataset.labels, labels[half][idx])
        x, _ = dm.sets[role]["val"][0]  # normalised with the backbone's mean/std (0.5)
        assert x.shape == (3, 16, 16) and -1.0 <= x.min() <= x.max() <= 1.0
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    assert (
        dm.class_counts() == np.bincount(dm.sets["source"]["train"].labels, minlength=10).tolist()
    )


def test_augment_is_per_side_and_mixup_only_touches_the_source():
    dm = pair(augment="basic", target_augment="none", mixup_alpha=0.4)
    dm.setup("fit")
    source, target = dm.sets["source"]["train"], dm.sets["target"]["train"]
    # augment none on the target: its training transform is the eval one (deterministic)
    assert torch.equal(target[0][0], target[0][0]) and repr(target.transform) == repr(
        dm.sets["target"]["val"].transform
    )
    assert repr(source.transform) != repr(dm.sets["source"]["val"].transform)
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert batch["source"][1].shape == (16, 10)  # MixUp's soft source targets
    assert isinstance(batch["target"], torch.Tensor)


def test_val_is_source_then_target_and_test_is_target_test():
    dm = pair()
    dm.setup("fit")
    dm.setup("test")
    val = dm.val_dataloader()
    assert [loader.dataset for loader in val] == [
        dm.sets["source"]["val"],
        dm.sets["target"]["val"],
    ]
    assert dm.test_dataloader().dataset is dm.sets["target"]["test"]
    assert [name for name, _ in dm.val_image_sets()] == ["source", "target"]


def test_class_mismatch_and_non_sources_are_refused():
    with pytest.raises(ValueError, match="must be an ImageSource"):
        pair(source="digits")
    with pytest.raises(ValueError, match="must be an ImageSource"):
        pair(target=DigitsMDataModule(backbone="dann_cnn", weights=None))  # no nested datamodules

    class Letters(DigitsMSource):
        @property
        def class_names(self):
            return list("abcdefghij")

    with pytest.raises(DataError, match="one label space"):
        pair(target=Letters())


def test_hyperparameters_are_plain_values_that_rebuild_the_pair(tmp_path):
    dm = pair(target=DigitsMSource(part="target", photo_seed=3))
    hp = dict(dm.hparams_initial)
    assert hp["target"] == {
        "class_path": "tl_lightning.data.digits_m.DigitsMSource",
        "init_args": {"part": "target", "blend": True, "photos": list(DEFAULT_PHOTOS),
                      "photo_seed": 3, "split": [0.6, 0.2, 0.2]},
    }  # fmt: skip
    torch.save(hp, tmp_path / "hp.pt")  # a checkpoint's datamodule hparams: no pickled objects
    assert torch.load(tmp_path / "hp.pt", weights_only=True) == hp
