"""CIFAR-10 (60,000 32x32 colour images in 10 classes) on ``torchvision.datasets.CIFAR10``."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.download import check_file, download_url, extract_archive
from tl_lightning.data.scan import SKIPPED
from tl_lightning.data.source import ImageSource, LabelledImages
from tl_lightning.data.split import carve_val
from tl_lightning.errors import DataError
from tl_lightning.file_io import atomic_write_text

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def _dataset_class():
    from torchvision.datasets import CIFAR10

    return CIFAR10


def cifar10_ready(root: str | Path) -> bool:
    """True when every CIFAR-10 batch file under ``root`` matches torchvision's md5."""
    cls = _dataset_class()
    folder = Path(root) / cls.base_folder
    files = [*cls.train_list, *cls.test_list, [cls.meta["filename"], cls.meta["md5"]]]
    return all(check_file(folder / name, md5, "md5") for name, md5 in files)


def _batch_files(root: Path) -> tuple[dict[str, list[Path]], list[tuple[str, str]]]:
    """Per split the batch files that match torchvision's md5; ``(path, reason)`` for the others."""
    cls = _dataset_class()
    folder = root / cls.base_folder
    good: dict[str, list[Path]] = {"train": [], "test": []}
    broken: list[tuple[str, str]] = []
    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        for name, md5 in files:
            path = folder / name
            if check_file(path, md5, "md5"):
                good[split].append(path)
            else:
                broken.append((str(path), "corrupted (md5 mismatch)" if path.exists() else "missing"))
    return good, broken


def _meta_ok(root: Path) -> bool:
    cls = _dataset_class()
    return check_file(root / cls.base_folder / cls.meta["filename"], cls.meta["md5"], "md5")


def download_cifar10(root: str | Path) -> None:
    """Fetch and unpack the CIFAR-10 python archive into ``root`` (verified md5, safe extraction).

    A batch file that broke after an earlier download is put back from the archive when the
    archive is still next to it; without the archive nothing is fetched again and
    :func:`load_cifar10` skips and reports the broken file (delete the folder to download afresh).
    """
    cls, root = _dataset_class(), Path(root)
    if cifar10_ready(root):
        return
    archive_there = check_file(root / cls.filename, cls.tgz_md5, "md5")
    if not archive_there and _meta_ok(root) and _batch_files(root)[0]["train"]:
        return  # downloaded before and partly broken since: load_cifar10 skips and reports
    archive = download_url(cls.url, root / cls.filename, cls.tgz_md5, "md5")
    extract_archive(archive, root)
    if not cifar10_ready(root):
        raise DataError(
            f"{archive} was verified but its batch files under {root / cls.base_folder} do not match "
            f"torchvision's checksums; delete {root / cls.base_folder} and {archive} and retry"
        )


def _read_pickle(path: Path) -> dict:
    # only files whose md5 matches torchvision's list of the official files get here
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _report_skipped(folder: Path, broken: list[tuple[str, str]], per_file: int, kept: int) -> None:
    """Warn loudly and write ``skipped.csv`` (path, reason) next to the batch files."""
    report = folder / SKIPPED

    def rows(f):
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(broken)

    try:
        atomic_write_text(report, rows, "CIFAR-10 skip report")
    except OSError as exc:  # a read-only data folder: the warning below still says it all
        report = f"(not written: {exc})"
    names = ", ".join(f"{Path(p).name} ({reason})" for p, reason in broken)
    rank_zero_warn(
        f"CIFAR-10: {len(broken)} batch file(s) under {folder} skipped: {names}. "
        f"{len(broken) * per_file:,} images left out, {kept:,} kept; reasons in {report}. "
        f"To get them back delete {folder} and run with download: true"
    )


def load_cifar10(
    root: str | Path, classes: list[str] | None = None, download: bool = False
) -> LabelledImages:
    """CIFAR-10's 60,000 images under ``root`` with official ``train``/``test`` splits.

    ``classes`` keeps only these, relabelled 0..k-1 in the order given. Batch files are
    md5-checked first: a missing or corrupted ``batches.meta`` is an error that says how to fix
    it; a missing or corrupted batch file (10,000 images) is skipped with a warning and a line in
    ``skipped.csv`` next to the batch files; when no training batch is left it is a
    :class:`~tl_lightning.errors.DataError`.
    """
    root = Path(root)
    folder = root / _dataset_class().base_folder
    if not _meta_ok(root):
        hint = "call prepare_data() first (the Trainer does)" if download else "set download: true"
        raise FileNotFoundError(
            f"CIFAR-10 not found (or corrupted) under '{folder}'; "
            f"{hint}, or point root at the folder holding cifar-10-batches-py"
        )
    meta = _read_pickle(folder / _dataset_class().meta["filename"])
    if list(meta["label_names"]) != CIFAR10_CLASSES:
        raise DataError(
            f"batches.meta under {root} lists classes {meta['label_names']}, expected {CIFAR10_CLASSES}"
        )
    good, broken = _batch_files(root)
    if not good["train"]:
        raise DataError(
            f"every CIFAR-10 training batch file under '{folder}' is missing or corrupted "
            f"({', '.join(Path(p).name for p, _ in broken)}); delete {folder} and run with "
            f"download: true"
        )
    keep_names = list(classes) if classes else list(CIFAR10_CLASSES)
    relabel = np.full(len(CIFAR10_CLASSES), -1)
    relabel[[CIFAR10_CLASSES.index(c) for c in keep_names]] = np.arange(len(keep_names))
    images, labels, splits, start, total = [], [], {}, 0, 0
    for split in ("train", "test"):
        entries = [_read_pickle(path) for path in good[split]]
        data = [np.asarray(e["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for e in entries]
        data = np.concatenate(data) if data else np.zeros((0, 3, 32, 32), np.uint8)
        targets = np.asarray([t for e in entries for t in e["labels"]], dtype=np.int64)
        total += len(targets)
        targets = relabel[targets]
        keep = targets >= 0
        images.append(torch.from_numpy(data[keep]))
        labels.append(targets[keep])
        splits[split] = np.arange(start, start + int(keep.sum()))
        start += int(keep.sum())
    if broken:
        _report_skipped(folder, broken, int(meta.get("num_cases_per_batch", 10000)), total)
    else:
        (folder / SKIPPED).unlink(missing_ok=True)  # repaired: an old report would mislead
    return LabelledImages(
        torch.cat(images), np.concatenate(labels), keep_names, splits, whole_image=True
    )


class CIFAR10Source(ImageSource):
    """CIFAR-10 as a source: the official test split, validation carved from train (stratified).

    Args:
        root: folder holding ``cifar-10-batches-py``. download: fetch it when missing.
        classes: keep only these classes, relabelled 0..k-1 in this order.
        val_fraction: share of the training set held out for validation.

    Example:
        >>> CIFAR10Source(root="data", classes=["cat", "dog"]).class_names
        ['cat', 'dog']
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        classes: list[str] | None = None,
        val_fraction: float = 0.1,
    ):
        unknown = sorted(set(classes or []) - set(CIFAR10_CLASSES))
        if unknown or (classes is not None and len(set(classes)) < 2):
            raise ValueError(f"classes must be 2+ distinct CIFAR-10 classes; unknown {unknown}; valid: {CIFAR10_CLASSES}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root, self.download = root, download
        self.classes = list(classes) if classes else None
        self.val_fraction = val_fraction

    @property
    def class_names(self) -> list[str]:
        return list(self.classes or CIFAR10_CLASSES)

    def prepare(self) -> None:
        if self.download:
            download_cifar10(self.root)

    def load(self, image_size: int) -> LabelledImages:
        return load_cifar10(self.root, self.class_names, self.download)

    def splits(self, images: LabelledImages, seed: int) -> dict[str, np.ndarray]:
        official = images.splits["train"]
        train, val = carve_val(images.labels[official], self.val_fraction, seed)
        rank_zero_info(
            f"CIFAR-10: {len(train)} train / {len(val)} val images "
            f"(val_fraction={self.val_fraction}, seed={seed})"
        )
        return {"train": official[train], "val": official[val], "test": images.splits["test"]}

    def check_split(self, split: str, indices: np.ndarray) -> None:
        if split == "test" and not len(indices):
            raise DataError(
                f"no CIFAR-10 test images under '{Path(self.root)}': test_batch was skipped (see "
                f"the warning and skipped.csv); delete cifar-10-batches-py and download again"
            )


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10: train 50,000 / test 10,000; validation carved from train (seeded, stratified).

    Data lives in ``{root}/cifar-10-batches-py`` (the archive ``cifar-10-python.tar.gz`` is kept
    next to it). The whole set is held in memory as uint8 (180 MB). At ``image_size: 32`` images are
    used at their native size; larger sizes upsample the full image (no center crop: at 32 px
    every border pixel counts).

    Args:
        root: folder holding ``cifar-10-batches-py``.
        download: fetch the archive (~170 MB, md5-checked) when missing.
        val_fraction: share of the training set held out for validation.
        classes: keep only these classes, relabelled 0..k-1 in this order (e.g. ``[cat, dog]``
            as the target domain of Cats-vs-Dogs).

    Example:
        >>> dm = CIFAR10DataModule(root="data", backbone="resnet18", weights=None, image_size=32)
        >>> dm.prepare_data(); dm.setup("fit")  # doctest: +SKIP
        >>> dm.class_names[:3]
        ['airplane', 'automobile', 'bird']
    """

    def __init__(
        self,
        *args,
        root: str = "data",
        download: bool = True,
        val_fraction: float = 0.1,
        classes: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(CIFAR10Source(root, download, classes, val_fraction), *args, **kwargs)
