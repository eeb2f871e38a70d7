"""ClassificationDataModule: one datamodule over any ImageSource; the per-dataset datamodules are
it with their source built from their own arguments (Flowers102Source included)."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from scipy.io import loadmat

from tests.data.test_bad_data import make_folder
from tests.helpers import TINY_DATA, print_config
from tl_lightning.cli import run_cli
from tl_lightning.data.cifar10 import CIFAR10DataModule
from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.data.flowers102 import Flowers102Source
from tl_lightning.data.image_folder import ImageFolderDataModule, ImageFolderSource
from tl_lightning.errors import DataError


# --- Flowers102Source ----------------------------------------------------------------------------
@pytest.mark.parametrize("trainval", [False, True])
def test_flowers102_source_gives_the_official_splits(flowers102_patched, trainval):
    source = Flowers102Source(
        str(flowers102_patched.root), download=False, train_on_trainval=trainval
    )
    images = source.load(image_size=32)
    splits = source.splits(images, seed=0)
    # expected straight from the .mat files: file image_<id>.jpg has label imagelabels[id - 1] - 1
    mat_labels = loadmat(flowers102_patched.labels_mat, squeeze_me=True)["labels"]
    set_ids = loadmat(flowers102_patched.setid_mat, squeeze_me=True)
    expected_ids = {
        "train": [*set_ids["trnid"], *(set_ids["valid"] if trainval else [])],
        "val": list(set_ids["valid"]),
        "test": list(set_ids["tstid"]),
    }
    for split, ids in expected_ids.items():
        files = [images.items[i].name for i in splits[split]]
        assert files == [f"image_{i:05d}.jpg" for i in ids], split
        assert images.labels[splits[split]].tolist() == [int(mat_labels[i - 1]) - 1 for i in ids]
    assert len(splits["train"]) == (204 if trainval else 102)


def test_flowers102_source_not_found_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="set download: true"):
        Flowers102Source(str(tmp_path), download=False).load(32)


# --- the generic datamodule ----------------------------------------------------------------------
def all_batches(dm) -> dict[str, list]:
    out = {}
    for split in ("train", "val", "test"):
        out[split] = [(x.clone(), y.clone()) for x, y in getattr(dm, f"{split}_dataloader")()]
    return out


def test_generic_datamodule_equals_the_image_folder_datamodule_batch_for_batch(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 9, "bee": 7, "cat": 8})
    (root / "bee" / "broken.png").write_bytes(b"not a png")
    split = {"val_fraction": 0.25, "test_fraction": 0.25}
    args = {**TINY_DATA, "augment": "basic", "seed": 3}
    generic = ClassificationDataModule(source=ImageFolderSource(str(root), **split), **args)
    folder = ImageFolderDataModule(str(root), **split, **args)
    for dm in (generic, folder):
        dm.prepare_data()
        dm.setup("fit")
        dm.setup("test")
    assert generic.class_names == folder.class_names == ["ant", "bee", "cat"]
    assert generic.class_counts() == folder.class_counts()
    got, expected = all_batches(generic), all_batches(folder)
    for split in ("train", "val", "test"):
        assert len(got[split]) == len(expected[split]) > 0
        for (x, y), (ex, ey) in zip(got[split], expected[split], strict=True):
            assert torch.equal(x, ex) and torch.equal(y, ey)
    skipped = [(path, reason.split(" (")[0]) for path, reason in generic.source.skipped()]
    assert skipped == [(str(root / "bee" / "broken.png"), "undecodable")]


def test_generic_hparams_hold_the_source_as_plain_values(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    dm = ClassificationDataModule(ImageFolderSource(str(root), val_fraction=0.25), **TINY_DATA)
    hp = dict(dm.hparams_initial)
    assert hp["source"] == {
        "class_path": "tl_lightning.data.image_folder.ImageFolderSource",
        "init_args": {
            "root": str(root),
            "val_fraction": 0.25,
            "test_fraction": 0.1,
            "scan_dir": None,
        },
    }
    torch.save(hp, tmp_path / "hp.pt")  # a checkpoint's datamodule hparams: no pickled objects
    assert torch.load(tmp_path / "hp.pt", weights_only=True) == hp
    # a dataset's own datamodule stores its own arguments only: they rebuild it
    digits = DigitsDataModule(**TINY_DATA)
    assert "source" not in digits.hparams
    assert DigitsDataModule(**digits.hparams).hparams == digits.hparams
    with pytest.raises(ValueError, match="source must be an ImageSource"):
        ClassificationDataModule(source="my_images", **TINY_DATA)


def yaml_config(root, tmp_path) -> str:
    config = {
        "model": {"class_path": "tl_lightning.modules.FineTuneModule",
                  "init_args": {"backbone": "resnet18", "weights": None}},
        "data": {"class_path": "tl_lightning.data.classification.ClassificationDataModule",
                 "init_args": {"source": {"class_path": "tl_lightning.data.image_folder.ImageFolderSource",
                                          "init_args": {"root": str(root), "val_fraction": 0.25}},
                               "image_size": 32, "batch_size": 4, "num_workers": 0}},
        "trainer": {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1,
                    "logger": False, "enable_progress_bar": False, "accelerator": "cpu",
                    "default_root_dir": str(tmp_path / "run")},
    }  # fmt: skip
    path = tmp_path / "generic.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_generic_datamodule_from_yaml_fits_round_trips_and_checkpoints_load_safely(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    config = yaml_config(root, tmp_path)
    first = print_config(["fit", "--config", config], capsys)
    (tmp_path / "printed.yaml").write_text(first)
    assert print_config(["fit", "--config", str(tmp_path / "printed.yaml")], capsys) == first
    assert "ImageFolderSource" in first
    cli = run_cli(["fit", "--config", config])
    assert isinstance(cli.datamodule.source, ImageFolderSource)
    assert cli.model.hparams.num_classes == 2 and cli.datamodule.class_names == ["a", "b"]
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]
    assert saved["source"]["class_path"] == "tl_lightning.data.image_folder.ImageFolderSource"
    assert saved["source"]["init_args"]["root"] == str(root)


# --- errors a split can raise (the source decides) -----------------------------------------------
def test_a_missing_test_split_is_the_sources_error(cifar10_patched, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cifar10_patched.root, root)
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    dm = CIFAR10DataModule(root=str(root), download=False, **TINY_DATA)
    with pytest.warns(UserWarning, match="1 batch file"):
        dm.setup("fit")  # fit needs no test images
    with pytest.raises(DataError, match="no CIFAR-10 test images"):
        dm.setup("test")
    folder = make_folder(tmp_path / "imgs", {"a": 4, "b": 4})
    no_test = ImageFolderDataModule(str(folder), test_fraction=0.0, **TINY_DATA)
    no_test.setup("fit")
    assert no_test.test_set is None
    with pytest.raises(ValueError, match="test_fraction is 0"):
        no_test.setup("test")


def test_only_the_train_split_is_augmented(tmp_path):
    root = make_folder(tmp_path / "imgs", {"a": 8, "b": 8})
    source = ImageFolderSource(str(root), val_fraction=0.25, test_fraction=0.25)
    dm = ClassificationDataModule(source, **{**TINY_DATA, "augment": "basic"})
    dm.setup()

    def ops(dataset) -> set[str]:
        return {type(op).__name__ for op in dataset.transform.transforms}

    random_ops = {"RandomResizedCrop", "RandomHorizontalFlip"}
    assert random_ops <= ops(dm.train_set)
    assert not random_ops & (ops(dm.val_set) | ops(dm.test_set))
    assert "CenterCrop" in ops(dm.val_set) and "CenterCrop" in ops(dm.test_set)
