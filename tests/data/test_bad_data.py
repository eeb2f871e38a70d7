"""Bad data: broken files are skipped and counted, never a crash or a wrong label; all-bad is an error."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from tests.helpers import TINY, quick_trainer
from tl_lightning.callbacks.skipped_images import SkippedImagesReport
from tl_lightning.cli import run_cli
from tl_lightning.data.base import MixBatch, ResumableSkipFailedDataLoader
from tl_lightning.data.dataset import ImageDataset, ImageFilesDataset
from tl_lightning.data.decode import (
    SKIP_LOG_NAME,
    FailedSample,
    SkipFailedDataLoader,
    read_skip_log,
    skip_failed_collate,
)
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.data.transforms import batch_mixer
from tl_lightning.errors import DataError
from tl_lightning.modules.feature_extraction import FeatureExtractionModule

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "folder" / "image_folder.yaml"
SMALL = {**TINY, "image_size": 16, "batch_size": 4, "num_workers": 0}


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), np.uint8)).save(
        buf, "JPEG"
    )
    return buf.getvalue()


def red_of(label: int) -> int:
    """Class ``c`` images are solid colours with red ``40 * (c + 1)``: the label is in the pixels."""
    return 40 * (label + 1)


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / name / f"{i:02d}.png").write_bytes(png((red_of(c), 8 * i, 0)))
    return root


def skipped_reasons(folder: Path) -> dict[str, str]:
    with open(folder / "skipped.csv", newline="") as f:
        return {row["path"]: row["reason"] for row in csv.DictReader(f)}


# --- folders -----------------------------------------------------------------------------------
def test_missing_and_empty_root_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root='.*nowhere' does not exist"):
        _ = ImageFolderDataModule(str(tmp_path / "nowhere"), **SMALL).class_names
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="0 class folder.*at least 2 subfolders of images"):
        _ = ImageFolderDataModule(str(tmp_path / "empty"), **SMALL).class_names


def test_class_folders_without_images_are_left_out_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 3, "bee": 3})
    (root / "cat").mkdir()  # empty
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")
    dm = ImageFolderDataModule(str(root), **SMALL)
    with pytest.warns(
        UserWarning, match=r"ignoring 2 class folder\(s\) without image files: \['cat', 'dog'\]"
    ):
        assert dm.class_names == ["ant", "bee"]
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 2 and len(dm.train_set) + len(dm.val_set) == 4


def test_every_broken_kind_is_skipped_with_its_reason_and_labels_stay_right(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", {"ant": 4, "bee": 4})
    broken = {
        "ant/empty.jpg": b"",
        "ant/truncated.jpg": jpeg()[:300],
        "ant/random.png": os.urandom(200),
        "bee/notes.txt": b"not an image",
        "bee/locked.jpg": jpeg(),
    }
    for rel, data in broken.items():
        (root / rel).write_bytes(data)
    (root / "bee" / "png_named.jpg").write_bytes(png((red_of(1), 0, 0)))  # odd but valid: kept
    locked = str(root / "bee" / "locked.jpg")
    real_read = Path.read_bytes

    def read_as_unprivileged_user(path):  # the tests run as root: chmod 000 files still read
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_as_unprivileged_user)
    dm = ImageFolderDataModule(str(root), **SMALL)
    dm.prepare_data()
    reasons = skipped_reasons(root)
    assert set(reasons) == set(broken)
    expected = {
        "ant/empty.jpg": "empty file",
        "ant/truncated.jpg": "truncated",
        "ant/random.png": "undecodable",
        "bee/notes.txt": "not an image file",
        "bee/locked.jpg": "unreadable",
    }
    for rel, kind in expected.items():
        assert reasons[rel].startswith(kind), (rel, reasons[rel])
    dm.setup(None)
    seen = 0
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for path, label in zip(split.paths, split.labels, strict=True):
            assert path.parent.name == dm.class_names[label]  # every label from its own folder
            seen += 1
    assert seen == 4 + 4 + 1


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads chmod 000 files; covered by the test above"
)
def test_chmod_000_file_is_skipped_as_unreadable(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 3, "bee": 3})
    locked = root / "ant" / "locked.png"
    locked.write_bytes(png((1, 2, 3)))
    locked.chmod(0)
    ImageFolderDataModule(str(root), **SMALL).prepare_data()
    assert skipped_reasons(root)["ant/locked.png"].startswith("unreadable")


def test_a_class_whose_every_image_is_broken_is_an_error(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 4})
    (root / "bee").mkdir()
    for i in range(3):
        (root / "bee" / f"{i}.jpg").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"class folder\(s\) \['bee'\].*fewer than 3 readable images"
    ):
        ImageFolderDataModule(str(root), **SMALL).prepare_data()


def test_a_folder_where_every_file_is_broken_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    for name in ("ant", "bee"):
        (root / name).mkdir(parents=True)
        (root / name / "0.jpg").write_bytes(jpeg()[:100])
        (root / name / "1.png").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"none of the 4 files .* is a readable image \(2 empty file, 2 truncated"
    ):
        ImageFolderDataModule(str(root), **SMALL).prepare_data()


# --- failures at decode time, in DataLoader workers, during training ---------------------------
class RecordBatches(Callback):
    """Keeps the (red channel, label) pairs of every training sample seen."""

    def __init__(self):
        self.samples: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cfg = trainer.datamodule.data_config
        x, y = batch
        red = (x[:, 0, 8, 8] * cfg.std[0] + cfg.mean[0]) * 255
        self.samples += list(zip(red.round().int().tolist(), y.tolist(), strict=True))


def test_images_breaking_in_workers_during_fit_are_dropped_and_reported(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 8, "bee": 8, "cat": 8})
    dm = ImageFolderDataModule(
        str(root), val_fraction=0.25, test_fraction=0.25, **{**SMALL, "num_workers": 2}
    )
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == 12  # 3 batches of 4: drop_last drops nothing
    # files that were fine at scan time break before training: changed on disk, disk errors...
    bad_train = [dm.train_set.paths[i] for i in (0, 5)]
    bad_val = [dm.val_set.paths[1]]
    bad_train[0].write_bytes(b"")
    bad_train[1].write_bytes(bad_train[1].read_bytes()[:60])
    bad_val[0].write_bytes(os.urandom(64))

    model = FeatureExtractionModule(
        num_classes=3, class_names=dm.class_names, cache_features=False, **TINY
    )
    record, report = RecordBatches(), SkippedImagesReport()
    trainer = quick_trainer(
        tmp_path,
        callbacks=[record, report],
        limit_train_batches=None,
        limit_val_batches=None,
        num_sanity_val_steps=0,
    )
    with pytest.warns(
        UserWarning,
        match=r"train epoch 0: skipped 3 image\(s\) that failed to load \(2 train, 1 val\)",
    ):
        trainer.fit(model, datamodule=dm)

    assert len(record.samples) == 12 - 2  # dropped, not replaced by another sample
    assert all(
        red == red_of(label) for red, label in record.samples
    )  # no label moved to another image
    log = read_skip_log(tmp_path / SKIP_LOG_NAME)
    assert sorted((r["split"], r["path"]) for r in log) == sorted(
        [("train", str(p)) for p in bad_train] + [("val", str(p)) for p in bad_val]
    )
    assert {r["reason"].split(" ")[0] for r in log} <= {"undecodable", "truncated"}
    assert report.total == 3 and trainer.callback_metrics["data/skipped_images"] == 3


def test_every_image_breaking_during_fit_is_an_error(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 4, "bee": 4})
    dm = ImageFolderDataModule(str(root), val_fraction=0.25, test_fraction=0.25, **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    for path in dm.train_set.paths:
        path.write_bytes(b"")
    model = FeatureExtractionModule(
        num_classes=2, class_names=dm.class_names, cache_features=False, **TINY
    )
    with pytest.raises(
        DataError, match=r"every image in this ImageDataset \(4 samples\) failed to load"
    ):
        quick_trainer(tmp_path, num_sanity_val_steps=0).fit(model, datamodule=dm)


def test_file_broken_after_scan_is_a_failed_sample_in_the_skip_log(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    good.write_bytes(png((10, 20, 30)))
    bad.write_bytes(b"\xff\xd8\xff\xe0 then nothing")
    ds = ImageDataset([good, bad], np.array([0, 1]))
    ds.skip_log, ds.split = str(tmp_path / SKIP_LOG_NAME), "train"
    assert ds[0][1] == 0
    failed = ds[1]
    assert isinstance(failed, FailedSample) and failed.path == str(bad)
    assert read_skip_log(ds.skip_log) == [
        {"split": "train", "path": str(bad), "reason": failed.reason}
    ]


def test_collates_drop_failed_samples_and_keep_labels_with_their_images():
    img = lambda v: torch.full((3, 2, 2), float(v))  # noqa: E731
    samples = [(img(0), 0), FailedSample("x", "undecodable"), (img(1), 1), None, (img(2), 2)]
    x, y = skip_failed_collate(samples)
    assert y.tolist() == [0, 1, 2] and x[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert skip_failed_collate([FailedSample("x", "r"), None]) == []
    # MixUp runs on what survived the collate; a batch where every image failed is dropped unmixed
    loader = ResumableSkipFailedDataLoader(
        [*samples, FailedSample("y", "r"), None], batch_size=5, collate_fn=skip_failed_collate,
        batch_transform=MixBatch(batch_mixer(0.4, 0.0, 3)),
    )  # fmt: skip
    ((mixed_x, mixed_y),) = list(loader)
    assert mixed_x.shape == (3, 3, 2, 2) and mixed_y.shape == (3, 3)


def test_predict_folder_skips_broken_files_and_refuses_an_all_broken_one(tmp_path):
    folder = tmp_path / "predict"
    folder.mkdir()
    for i in range(3):
        (folder / f"ok{i}.png").write_bytes(png((i, i, i)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    dm = ImageFolderDataModule(
        str(make_folder(tmp_path / "imgs", {"a": 3, "b": 3})), predict_dir=str(folder), **SMALL
    )
    loader = dm.predict_dataloader()
    assert isinstance(loader, SkipFailedDataLoader)
    names = sorted(Path(p).name for batch in loader for p in batch[1])
    assert names == ["ok0.png", "ok1.png", "ok2.png"]

    for path in folder.glob("ok*.png"):
        path.write_bytes(b"")
    with pytest.raises(DataError, match="every image in this ImageFilesDataset"):
        list(dm.predict_dataloader())
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images .* found under"):
        ImageFilesDataset(tmp_path / "no_images")


def test_shipped_folder_config_fits_on_a_messy_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "imgs", {"ant": 4, "bee": 4})
    (root / "ant" / "broken.jpg").write_bytes(b"")
    (root / "bee" / "Thumbs.db").write_bytes(b"\x00" * 10)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--data.init_args.root={root}",
            "--model.init_args.backbone=resnet18",
            "--model.init_args.weights=null",
            "--data.init_args.image_size=16",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
        ]
    )
    assert cli.datamodule.class_names == ["ant", "bee"]
    assert set(skipped_reasons(root)) == {"ant/broken.jpg", "bee/Thumbs.db"}
    assert any(isinstance(c, SkippedImagesReport) for c in cli.trainer.callbacks)
