"""CIFAR10DataModule on real-format pickle batches: prepared root, download path, splits, CLI."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10

from tests.data.conftest import CIFAR_PER_CLASS_PER_BATCH
from tests.helpers import TINY_DATA, tiny_fit_args
from tl_lightning.cli import run_cli
from tl_lightning.data.cifar10 import CIFAR10_CLASSES, CIFAR10DataModule
from tl_lightning.errors import DataError

SMALL = TINY_DATA
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "cifar10"
N_TRAIN = 5 * 10 * CIFAR_PER_CLASS_PER_BATCH


def test_prepared_root_splits_and_batches(cifar10_patched):
    dm = CIFAR10DataModule(
        root=str(cifar10_patched.root), download=False, val_fraction=0.2, **SMALL
    )
    assert dm.class_names == CIFAR10_CLASSES and dm.num_classes == 10
    dm.prepare_data()  # download: false -> nothing to do
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (
        80,
        20,
        10 * CIFAR_PER_CLASS_PER_BATCH,
    )
    assert Counter(dm.val_set.labels.tolist()) == dict.fromkeys(range(10), 2)  # stratified
    assert dm.class_counts() == [8] * 10
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    # eval at native size is exactly ToTensor + the backbone's normalisation of the stored pixels
    raw = CIFAR10(str(cifar10_patched.root), train=True)
    idx = dm.split_indices("val")[0]
    mean, std = (
        torch.tensor(dm.data_config.mean)[:, None, None],
        torch.tensor(dm.data_config.std)[:, None, None],
    )
    expected = (torch.from_numpy(raw.data[idx]).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(dm.val_set[0][0], expected, atol=1e-5)
    assert dm.val_set[0][1] == raw.targets[idx]


def test_upsampled_images(cifar10_patched):
    dm = CIFAR10DataModule(
        root=str(cifar10_patched.root), download=False, **{**SMALL, "image_size": 64}
    )
    dm.setup("fit")
    assert dm.val_set[0][0].shape == (3, 64, 64)
    assert dm.train_set[0][0].shape == (3, 64, 64)


def test_val_split_is_seeded(cifar10_patched):
    a = CIFAR10DataModule(root=str(cifar10_patched.root), download=False, seed=1, **SMALL)
    b = CIFAR10DataModule(root=str(cifar10_patched.root), download=False, seed=1, **SMALL)
    c = CIFAR10DataModule(root=str(cifar10_patched.root), download=False, seed=2, **SMALL)
    for dm in (a, b, c):
        dm.setup("fit")
    val = [dm.split_indices("val") for dm in (a, b, c)]
    assert np.array_equal(val[0], val[1]) and not np.array_equal(val[0], val[2])


def test_download_checksum_extract_load(cifar10_patched, loopback, tmp_path, monkeypatch):
    monkeypatch.setattr(
        CIFAR10, "url", loopback.add("cifar-10-python.tar.gz", cifar10_patched.archive)
    )
    loopback.cuts["cifar-10-python.tar.gz"] = 1  # and the first attempt is cut off mid-body
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]
    assert [r[1] is not None for r in loopback.requests] == [False, True]  # resumed with Range
    dm.prepare_data()  # verified on disk: no second download
    assert len(loopback.requests) == 2


def test_download_with_wrong_checksum_leaves_nothing(
    cifar10_patched, loopback, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        CIFAR10, "url", loopback.add("cifar-10-python.tar.gz", cifar10_patched.archive)
    )
    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), **SMALL)
    with pytest.raises(DataError, match="md5"):
        dm.prepare_data()
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        dm.setup("fit")


def _break(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")


def test_a_batch_file_broken_after_download_is_skipped_and_reported(cifar10_patched, tmp_path):
    # was: a FileNotFoundError for the whole dataset; issue 17 asks for skip + report like the
    # image folders (a batch file is 10,000 real images: a loud warning with the count)
    root = tmp_path / "data"
    shutil.copytree(cifar10_patched.root, root)
    folder = root / "cifar-10-batches-py"
    _break(folder / "data_batch_3")
    (folder / "data_batch_5").unlink()
    per_file = 10 * CIFAR_PER_CLASS_PER_BATCH
    dm = CIFAR10DataModule(root=str(root), download=False, val_fraction=0.2, **SMALL)
    with pytest.warns(UserWarning, match=f"2 batch file.*{2 * per_file} images left out"):
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN - 2 * per_file
    raw = CIFAR10(str(cifar10_patched.root), train=True)  # the three batches kept, in order
    kept = np.concatenate([raw.data[i * per_file : (i + 1) * per_file] for i in (0, 1, 3)])
    assert torch.equal(dm.load_images().items[:len(kept)], torch.from_numpy(kept).permute(0, 3, 1, 2))
    rows = (folder / "skipped.csv").read_text().splitlines()
    assert rows == ["path,reason", f"{folder / 'data_batch_3'},corrupted (md5 mismatch)",
                    f"{folder / 'data_batch_5'},missing"]  # fmt: skip
    for name in ("data_batch_3", "data_batch_5"):  # fixed by hand: no stale report is left
        shutil.copy(cifar10_patched.root / "cifar-10-batches-py" / name, folder / name)
    CIFAR10DataModule(root=str(root), download=False, **SMALL).setup("fit")
    assert not (folder / "skipped.csv").exists()


def test_every_training_batch_broken_is_a_data_error(cifar10_patched, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cifar10_patched.root, root)
    for i in range(1, 6):
        _break(root / "cifar-10-batches-py" / f"data_batch_{i}")
    dm = CIFAR10DataModule(root=str(root), download=False, **SMALL)
    with pytest.raises(DataError, match="every CIFAR-10 training batch file.*data_batch_1"):
        dm.setup("fit")


def test_a_broken_test_batch_leaves_training_alone_and_test_says_why(cifar10_patched, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cifar10_patched.root, root)
    _break(root / "cifar-10-batches-py" / "test_batch")
    dm = CIFAR10DataModule(root=str(root), download=False, **SMALL)
    with pytest.warns(UserWarning, match="test_batch"):
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN
    with pytest.raises(DataError, match="test_batch was skipped"):
        dm.setup("test")


def test_download_true_repairs_a_broken_batch_from_the_kept_archive(cifar10_patched, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(cifar10_patched.root, root)
    shutil.copy(cifar10_patched.archive, root)  # the archive stays next to the data
    _break(root / "cifar-10-batches-py" / "data_batch_2")
    with pytest.warns(UserWarning, match="data_batch_2"):
        CIFAR10DataModule(root=str(root), download=False, **SMALL).setup("fit")
    assert (root / "cifar-10-batches-py" / "skipped.csv").is_file()
    dm = CIFAR10DataModule(root=str(root), **SMALL)  # download: true; the URL is unreachable
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN  # put back, nothing lost
    (root / "cifar-10-python.tar.gz").unlink()
    _break(root / "cifar-10-batches-py" / "data_batch_2")
    dm = CIFAR10DataModule(root=str(root), **SMALL)
    dm.prepare_data()  # no archive: no download over a partly good folder, skip and report
    with pytest.warns(UserWarning, match="data_batch_2"):
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == N_TRAIN - 10 * CIFAR_PER_CLASS_PER_BATCH


@pytest.mark.parametrize("config", ["feature_extraction_resnet50.yaml", "finetune_resnet50.yaml"])
def test_shipped_configs_fit_under_the_cli(cifar10_patched, tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(tiny_fit_args(CONFIGS / config, cifar10_patched.root))
    assert cli.model.class_names == CIFAR10_CLASSES
    assert cli.trainer.state.finished


def test_class_subset_is_relabelled_in_the_given_order(cifar10_patched):
    dm = CIFAR10DataModule(
        root=str(cifar10_patched.root),
        download=False,
        classes=["dog", "cat"],
        val_fraction=0.2,
        **SMALL,
    )
    dm.setup()
    assert dm.class_names == ["dog", "cat"] and dm.num_classes == 2
    raw = CIFAR10(str(cifar10_patched.root), train=False)
    originals = [raw.targets[i] for i in range(len(raw.targets)) if raw.targets[i] in (3, 5)]
    assert dm.test_set.labels.tolist() == [0 if t == 5 else 1 for t in originals]
    assert dm.class_counts() == [8, 8]
    with pytest.raises(ValueError, match="unknown \\['kangaroo'\\]"):
        CIFAR10DataModule(
            root=str(cifar10_patched.root), download=False, classes=["cat", "kangaroo"], **SMALL
        )
