"""CatsDogsDataModule: download, scan (skip and report broken files, load odd ones as RGB), cache, splits."""

from __future__ import annotations

import csv
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import tl_lightning.data.cats_dogs as cats_dogs
import tl_lightning.data.decode as folder_module
from tests.data.conftest import PET_BROKEN, PET_ODD, PET_PER_CLASS, sha256
from tests.helpers import TINY_DATA, tiny_fit_args
from tl_lightning.cli import run_cli
from tl_lightning.data.cats_dogs import CatsDogsDataModule
from tl_lightning.errors import DataError, UnsafeFileError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cats_dogs"
SMALL = TINY_DATA


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_scan_skips_and_reports_every_broken_kind(petimages_root):
    dm = CatsDogsDataModule(root=str(petimages_root), download=False, **SMALL)
    dm.prepare_data()
    folder = petimages_root / "cats_dogs" / "PetImages"
    skipped = {row["path"]: row["reason"] for row in read_csv(folder / "skipped.csv")}
    assert set(skipped) == {p.removeprefix("PetImages/") for p in PET_BROKEN.values()}
    for kind, path in PET_BROKEN.items():
        assert skipped[path.removeprefix("PetImages/")].startswith(kind), (kind, skipped)
    manifest = read_csv(folder / "manifest.csv")
    paths = {row["path"] for row in manifest}
    assert {p.removeprefix("PetImages/") for p in PET_ODD.values()} <= paths  # odd but valid: kept
    assert len(manifest) == 2 * PET_PER_CLASS + len(PET_ODD)
    assert {row["class"] for row in manifest} == {"Cat", "Dog"}
    assert all(row["class"] == dm.class_names[int(row["label"])] for row in manifest)
    assert all(row["class"] in row["path"] for row in manifest)


def hwc(image) -> np.ndarray:
    """A decoded image (PIL, or a ``[3, H, W]`` tensor from the fast JPEG path) as ``H x W x 3``."""
    return image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


@pytest.fixture(params=["pil", "fast"])
def decoder(request, monkeypatch):
    """Both JPEG decoders: PIL, and TorchCodec's tensor path (part of the dev install)."""
    monkeypatch.setenv(folder_module.DECODER_ENV, request.param)
    folder_module.fast_jpeg_decoder.cache_clear()
    yield request.param
    folder_module.fast_jpeg_decoder.cache_clear()


def test_odd_images_load_as_rgb(petimages_root, decoder):
    if decoder == "fast":
        assert folder_module.fast_jpeg_decoder() is not None, "torchcodec is in the dev extra"
    dm = CatsDogsDataModule(root=str(petimages_root), download=False, augment="none", **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    folder = petimages_root / "cats_dogs" / "PetImages"
    for path in PET_ODD.values():
        image = hwc(cats_dogs.load_rgb(folder.parent / path))
        assert image.ndim == 3 and image.shape[2] == 3, path
    rotated = hwc(cats_dogs.load_rgb(folder.parent / PET_ODD["exif_rotated"]))
    assert rotated.shape == (
        20,
        10,
        3,
    )  # stored 20 wide x 10 high, EXIF says turn 90 degrees clockwise
    top, bottom = rotated[:8].reshape(-1, 3).mean(0), rotated[-8:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    cmyk = hwc(cats_dogs.load_rgb(folder.parent / PET_ODD["cmyk"])).reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # CMYK (0, 255, 255, 0) is red
    gray = hwc(cats_dogs.load_rgb(folder.parent / PET_ODD["grayscale"]))
    assert gray.shape[2] == 3 and np.array_equal(gray[..., 0], gray[..., 2])
    # and through the datamodule: every split yields normalised 3-channel tensors
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}


def test_scan_is_cached_and_redone_when_the_folder_changes(petimages_root, count_loads):
    first = CatsDogsDataModule(root=str(petimages_root), download=False, **SMALL)
    first.prepare_data()
    first.setup("fit")
    n_files = 2 * PET_PER_CLASS + len(PET_ODD) + len(PET_BROKEN) - 2  # empty + Thumbs.db: no decode
    assert len(count_loads) == n_files
    count_loads.clear()

    second = CatsDogsDataModule(root=str(petimages_root), download=False, **SMALL)
    second.prepare_data()
    second.setup("fit")
    assert count_loads == []  # read from manifest.csv, nothing decoded
    assert len(second.train_set) == len(first.train_set)
    assert second.train_labels().tolist() == first.train_labels().tolist()

    (
        petimages_root / "cats_dogs" / "PetImages" / "Dog" / "11702.jpg"
    ).unlink()  # the folder changes
    third = CatsDogsDataModule(root=str(petimages_root), download=False, **SMALL)
    third.setup("fit")
    assert len(count_loads) == n_files - 1
    info = (petimages_root / "cats_dogs" / "PetImages" / "skipped.csv").read_text()
    assert "11702" not in info


def test_download_extract_scan_via_loopback(loopback, petimages_zip, tmp_path, monkeypatch):
    monkeypatch.setattr(
        cats_dogs, "PETIMAGES_URL", loopback.add("kagglecatsanddogs_5340.zip", petimages_zip)
    )
    monkeypatch.setattr(cats_dogs, "PETIMAGES_SHA256", sha256(petimages_zip))
    dm = CatsDogsDataModule(root=str(tmp_path / "data"), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    folder = tmp_path / "data" / "cats_dogs"
    assert sorted(p.name for p in folder.iterdir()) == [
        "CDLA-Permissive-2.0.pdf",
        "PetImages",
        "kagglecatsanddogs_5340.zip",
        "readme[1].txt",
    ]
    assert (folder / "PetImages" / "manifest.csv").exists()
    assert len(dm.train_set) + len(dm.val_set) == 2 * PET_PER_CLASS + len(PET_ODD) - len(
        dm.split_indices("test")
    )
    dm.prepare_data()  # second call: files verified present, no new request
    assert len(loopback.requests) == 1


def test_download_with_wrong_checksum_leaves_nothing(
    loopback, petimages_zip, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        cats_dogs, "PETIMAGES_URL", loopback.add("kagglecatsanddogs_5340.zip", petimages_zip)
    )
    monkeypatch.setattr(cats_dogs, "PETIMAGES_SHA256", "f" * 64)
    dm = CatsDogsDataModule(root=str(tmp_path / "data"), **SMALL)
    with pytest.raises(DataError, match="sha256"):
        dm.prepare_data()
    assert list((tmp_path / "data" / "cats_dogs").iterdir()) == []


def test_archive_escaping_its_folder_is_refused(loopback, tmp_path, monkeypatch):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("PetImages/Cat/1.jpg", b"x")
        zf.writestr("../../escaped.txt", b"pwned")
    monkeypatch.setattr(
        cats_dogs, "PETIMAGES_URL", loopback.add("kagglecatsanddogs_5340.zip", evil)
    )
    monkeypatch.setattr(cats_dogs, "PETIMAGES_SHA256", sha256(evil))
    dm = CatsDogsDataModule(root=str(tmp_path / "a" / "b"), **SMALL)
    with pytest.raises(UnsafeFileError):
        dm.prepare_data()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "a" / "escaped.txt").exists()
    assert not (tmp_path / "a" / "b" / "cats_dogs" / "PetImages").exists()


def test_missing_data_without_download_is_a_clear_error(tmp_path):
    dm = CatsDogsDataModule(root=str(tmp_path), download=False, **SMALL)
    with pytest.raises(FileNotFoundError, match="set download: true"):
        dm.setup("fit")


def test_own_folder_with_n_classes_and_seeded_stratified_split(class_folder):
    folder = class_folder({"zebra": 20, "ant": 20, "moose": 20})
    dm = CatsDogsDataModule(data_dir=str(folder), seed=3, **SMALL)
    assert dm.class_names == ["ant", "moose", "zebra"] and dm.num_classes == 3
    dm.prepare_data()
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [48, 6, 6]
    for ds in (dm.val_set, dm.test_set):
        assert Counter(ds.labels.tolist()) == {0: 2, 1: 2, 2: 2}  # stratified
    all_paths = [p for ds in (dm.train_set, dm.val_set, dm.test_set) for p in ds.paths]
    assert len(set(all_paths)) == 60  # disjoint, complete
    again = CatsDogsDataModule(data_dir=str(folder), seed=3, **SMALL)
    again.setup()
    assert again.val_set.paths == dm.val_set.paths  # same seed, same split
    other = CatsDogsDataModule(data_dir=str(folder), seed=4, **SMALL)
    other.setup()
    assert other.val_set.paths != dm.val_set.paths


def test_one_class_folder_is_refused(class_folder):
    folder = class_folder({"only": 5})
    dm = CatsDogsDataModule(data_dir=str(folder), **SMALL)
    with pytest.raises(DataError, match="at least 2"):
        dm.setup("fit")


def test_weighted_sampler_balances_an_imbalanced_set(class_folder):
    folder = class_folder({"common": 60, "rare": 8})
    dm = CatsDogsDataModule(data_dir=str(folder), sampler="weighted", **SMALL)
    dm.setup("fit")
    labels = dm.train_labels()
    assert np.bincount(labels).tolist() == [48, 6]  # 8:1 in the data
    sampler = dm.train_dataloader().sampler
    epochs = []
    for epoch in range(20):  # 20 epochs of indices, each epoch its own draw
        sampler.set_epoch(epoch)
        epochs.append(labels[sampler.order()])  # the indices (the loader gets (epoch, index))
    drawn = np.concatenate(epochs)
    rare_share = (drawn == 1).mean()
    assert 0.4 < rare_share < 0.6, rare_share  # ~1/2 instead of 1/9
    plain = CatsDogsDataModule(data_dir=str(folder), **SMALL)
    plain.setup("fit")
    plain_sampler = plain.train_dataloader().sampler
    assert sorted(plain_sampler.order()) == list(range(len(plain.train_set)))  # a permutation, no weights


def write_config(tmp_path: Path, data_args: str, model: str = "FeatureExtractionModule") -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"""
model:
  class_path: tl_lightning.modules.{model}
  init_args:
    backbone: resnet18
    weights: null
data:
  class_path: tl_lightning.data.cats_dogs.CatsDogsDataModule
  init_args:
    image_size: 32
    batch_size: 4
    num_workers: 0
{data_args}
trainer:
  accelerator: cpu
  precision: 32-true
"""
    )
    return cfg


def test_shipped_config_fits_and_logs_per_class_test_metrics(petimages_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = tiny_fit_args(CONFIGS / "feature_extraction_vgg16.yaml", petimages_root)
    cli = run_cli([*args, "--data.init_args.sampler=weighted"])
    assert cli.model.class_names == ["Cat", "Dog"] and cli.model.hparams.num_classes == 2
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    for name in ("Cat", "Dog"):
        for kind in ("precision", "recall", "f1"):
            assert 0.0 <= float(metrics[f"test/{kind}/{name}"]) <= 1.0


def test_cli_fit_through_the_download_path(loopback, petimages_zip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        cats_dogs, "PETIMAGES_URL", loopback.add("kagglecatsanddogs_5340.zip", petimages_zip)
    )
    monkeypatch.setattr(cats_dogs, "PETIMAGES_SHA256", sha256(petimages_zip))
    cfg = write_config(tmp_path, "    root: data\n    download: true")
    run_cli(["fit", "--config", str(cfg), "--trainer.fast_dev_run=true"])
    assert (tmp_path / "data" / "cats_dogs" / "PetImages" / "skipped.csv").exists()
    assert (
        os.path.getsize(tmp_path / "data" / "cats_dogs" / "kagglecatsanddogs_5340.zip")
        == petimages_zip.stat().st_size
    )
