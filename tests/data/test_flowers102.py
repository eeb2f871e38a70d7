"""Flowers102DataModule on real-format files (jpg/ + imagelabels.mat + setid.mat): splits, download, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import loadmat
from torchvision.datasets import Flowers102

import tl_lightning.data.flowers102 as flowers102
from tests.helpers import TINY_DATA, tiny_fit_args
from tl_lightning.cli import run_cli
from tl_lightning.data.flowers102 import FLOWERS102_CLASSES, Flowers102DataModule
from tl_lightning.errors import DataError

SMALL = TINY_DATA
CONFIG = (
    Path(__file__).resolve().parents[2] / "configs" / "flowers102" / "finetune_efficientnet_b0.yaml"
)


def test_class_names_match_torchvision():
    assert Flowers102.classes == FLOWERS102_CLASSES and len(FLOWERS102_CLASSES) == 102


def test_official_splits_and_labels(flowers102_patched):
    dm = Flowers102DataModule(root=str(flowers102_patched.root), download=False, **SMALL)
    assert dm.num_classes == 102 and dm.class_names[0] == "pink primrose"
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (102, 102, 102)
    # labels are imagelabels.mat - 1, for exactly the ids setid.mat lists
    mat_labels = loadmat(flowers102_patched.labels_mat, squeeze_me=True)["labels"]
    train_ids = loadmat(flowers102_patched.setid_mat, squeeze_me=True)["trnid"]
    assert dm.train_labels().tolist() == (mat_labels[train_ids - 1] - 1).tolist()
    assert sorted(dm.train_labels().tolist()) == list(range(102))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.max() < 102
    # val and test are deterministic (eval transform), train is augmented
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_train_on_trainval(flowers102_patched):
    dm = Flowers102DataModule(
        root=str(flowers102_patched.root), download=False, train_on_trainval=True, **SMALL
    )
    dm.setup("fit")
    assert len(dm.train_set) == 204 and len(dm.val_set) == 102
    assert np.bincount(dm.train_labels()).tolist() == [2] * 102
    assert dm.class_counts() == [2] * 102


def test_download_checksum_extract_load(flowers102_patched, loopback, tmp_path, monkeypatch):
    f = flowers102_patched
    loopback.add("102flowers.tgz", f.archive)
    loopback.add("imagelabels.mat", f.labels_mat)
    loopback.add("setid.mat", f.setid_mat)
    monkeypatch.setattr(flowers102, "FLOWERS102_URL", loopback.url(""))
    dm = Flowers102DataModule(root=str(tmp_path / "data"), **SMALL)
    dm.prepare_data()
    dm.setup()
    folder = tmp_path / "data" / "flowers-102"
    assert sorted(p.name for p in folder.iterdir()) == [
        "102flowers.tgz",
        "imagelabels.mat",
        "jpg",
        "setid.mat",
    ]
    assert len(list((folder / "jpg").iterdir())) == 306
    assert len(dm.test_set) == 102
    dm.prepare_data()
    assert len(loopback.requests) == 3  # verified on disk: nothing fetched twice


def test_download_with_wrong_checksum_leaves_nothing(
    flowers102_patched, loopback, tmp_path, monkeypatch
):
    f = flowers102_patched
    loopback.add("102flowers.tgz", f.archive)
    monkeypatch.setattr(flowers102, "FLOWERS102_URL", loopback.url(""))
    monkeypatch.setitem(flowers102.FLOWERS102_FILES, "image", ("102flowers.tgz", "0" * 32))
    dm = Flowers102DataModule(root=str(tmp_path / "data"), **SMALL)
    with pytest.raises(DataError, match="md5"):
        dm.prepare_data()
    assert list((tmp_path / "data" / "flowers-102").iterdir()) == []


def test_missing_data_without_download(tmp_path):
    dm = Flowers102DataModule(root=str(tmp_path), download=False, **SMALL)
    with pytest.raises(FileNotFoundError, match="flowers-102.*set download: true"):
        dm.setup("fit")


def test_shipped_config_fits_under_the_cli(flowers102_patched, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(tiny_fit_args(CONFIG, flowers102_patched.root))
    assert cli.trainer.state.finished
    assert cli.model.hparams.num_classes == 102 and cli.model.class_names[-1] == "blackberry lily"
    assert cli.model.hparams.head_dropout == 0.3 and cli.model.hparams.label_smoothing == 0.1
    assert cli.datamodule.hparams.augment == "strong"
