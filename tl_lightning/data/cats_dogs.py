"""Cats vs Dogs (Microsoft's PetImages archive) or any ``{class}/*.jpg`` folder, scanned once.

Every file is decoded once (full decode, as the loader will), the valid ones go to
``manifest.csv`` and the others to ``skipped.csv`` (path, reason), next to the data. The scan is
cached in ``scan.json`` and reused while the folder is unchanged (same files, sizes, mtimes).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from tqdm.auto import tqdm

from tl_lightning.data.base import ImageDataModule, stratified_split
from tl_lightning.data.download import download_url, extract_archive
from tl_lightning.data.folder import (
    IMAGE_EXTENSIONS,
    FailedSample,
    SkippingDataset,
    failure_reason,
    load_rgb,
)
from tl_lightning.errors import DataError

PETIMAGES_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/"
    "kagglecatsanddogs_5340.zip"
)
# sha256 of kagglecatsanddogs_5340.zip (~825 MB) as published by gomlx's dogsvscats example;
# not re-checked offline here. A mismatch stops the download with a clear error.
PETIMAGES_SHA256 = "b7974bd00a84a99921f36ee4403f089853777b5ae8d151c76a86e64900334af9"
PETIMAGES_CLASSES = ["Cat", "Dog"]

SCAN_VERSION = 2  # 2: file permissions are part of the fingerprint
MANIFEST, SKIPPED, SCAN_INFO = "manifest.csv", "skipped.csv", "scan.json"


@dataclass
class ScanResult:
    """Valid files ``(relative path, label)`` and skipped ones ``(relative path, reason)``."""

    folder: Path
    classes: list[str]
    valid: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    cached: bool = False

    @property
    def paths(self) -> list[Path]:
        return [self.folder / rel for rel, _ in self.valid]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.valid]


def class_folders(folder: str | Path) -> list[str]:
    """Sorted names of the non-hidden subfolders of ``folder``: one class each."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder '{folder}' does not exist")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path, classes: list[str]) -> list[tuple[str, int, os.stat_result]]:
    files = []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.is_file() and not any(
                part.startswith(".") for part in path.relative_to(folder).parts
            ):
                files.append((path.relative_to(folder).as_posix(), label, path.stat()))
    return files


def _fingerprint(classes: list[str], files: list[tuple[str, int, os.stat_result]]) -> str:
    digest = hashlib.sha256(f"v{SCAN_VERSION}|{'|'.join(classes)}\n".encode())
    for rel, label, st in files:
        # st_mode too: a chmod (unreadable -> readable) changes what loads but not the mtime
        digest.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_mode}\n".encode())
    return digest.hexdigest()


def check_image(
    path: Path, size: int, load: Callable[[Path], Image.Image | torch.Tensor]
) -> str | None:
    """``None`` when the file decodes fully to an RGB image, else why it is skipped."""
    if size == 0:
        return "empty file (0 bytes)"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (extension '{path.suffix or '(none)'}')"
    try:
        image = load(path)
    except Exception as e:  # noqa: BLE001 -- a scan reports every failure, it never crashes on one
        return failure_reason(e)
    width_height = tuple(image.shape[:0:-1]) if isinstance(image, torch.Tensor) else image.size
    if min(width_height) < 1:
        return f"degenerate image size {width_height}"
    return None


def _write_atomic(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(
    out_dir: Path, folder: Path, classes: list[str], fingerprint: str
) -> ScanResult | None:
    info_path = out_dir / SCAN_INFO
    try:
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") != fingerprint or info.get("classes") != classes:
            return None
        with open(out_dir / MANIFEST, newline="", encoding="utf-8") as f:
            valid = [(row["path"], int(row["label"])) for row in csv.DictReader(f)]
        with open(out_dir / SKIPPED, newline="", encoding="utf-8") as f:
            skipped = [(row["path"], row["reason"]) for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError):
        return None
    if len(valid) != info.get("valid") or len(skipped) != info.get("skipped"):
        return None
    return ScanResult(folder, classes, valid, skipped, cached=True)


def _write_cache(out_dir: Path, result: ScanResult, fingerprint: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)

    def manifest(f):
        writer = csv.writer(f)
        writer.writerow(["path", "label", "class"])
        writer.writerows((rel, label, result.classes[label]) for rel, label in result.valid)

    def skipped(f):
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(result.skipped)

    info = {
        "version": SCAN_VERSION,
        "folder": str(result.folder),
        "classes": result.classes,
        "valid": len(result.valid),
        "skipped": len(result.skipped),
        "fingerprint": fingerprint,
    }
    _write_atomic(out_dir / MANIFEST, manifest)
    _write_atomic(out_dir / SKIPPED, skipped)
    _write_atomic(
        out_dir / SCAN_INFO, lambda f: json.dump(info, f, indent=1)
    )  # last: marks it complete


def scan_image_folder(
    folder: str | Path,
    load: Callable[[Path], Image.Image | torch.Tensor],
    out_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = True,
    classes: list[str] | None = None,
) -> ScanResult:
    """Decode every file under ``folder/{class}/`` once; cache and return what loads and what not.

    ``load`` is the decoder the dataset will use (so "valid" means "the loader reads it").
    Decoding runs on ``workers`` threads (PIL releases the GIL while decoding). The manifest,
    report and cache go to ``out_dir`` (default: ``folder``). ``classes`` restricts the scan to
    these subfolders (default: every non-hidden subfolder).
    """
    folder = Path(folder)
    out_dir = Path(out_dir) if out_dir is not None else folder
    classes = class_folders(folder) if classes is None else list(classes)
    if len(classes) < 2:
        raise DataError(
            f"'{folder}' has {len(classes)} class folder(s) {classes}; a classifier needs at least 2 "
            f"subfolders, one per class (e.g. {folder}/cat/*.jpg and {folder}/dog/*.jpg)"
        )
    files = _class_files(folder, classes)
    fingerprint = _fingerprint(classes, files)
    cached = _read_cache(out_dir, folder, classes, fingerprint)
    if cached is not None:
        return cached

    def check(item):
        rel, _, st = item
        return check_image(folder / rel, st.st_size, load)

    result = ScanResult(folder, classes)
    workers = workers or min(8, os.cpu_count() or 1)
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool:
        warnings.simplefilter(
            "ignore"
        )  # PIL's "corrupt EXIF" chatter: real failures are reported below
        reasons = tqdm(
            pool.map(check, files),
            total=len(files),
            desc=f"scan {folder.name}",
            unit="img",
            disable=not progress,
        )
        for (rel, label, _), reason in zip(files, reasons, strict=True):
            if reason is None:
                result.valid.append((rel, label))
            else:
                result.skipped.append((rel, reason))
    _write_cache(out_dir, result, fingerprint)
    rank_zero_info(
        f"scanned {len(files)} files in {folder}: {len(result.valid)} valid, {len(result.skipped)} "
        f"skipped (reasons in {out_dir / SKIPPED}; manifest {out_dir / MANIFEST})"
    )
    return result


def _skip_summary(skipped: list[tuple[str, str]]) -> str:
    kinds: dict[str, int] = {}
    for _, reason in skipped:
        kind = reason.split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"


class ImageListDataset(SkippingDataset):
    """``(transform(image), label)`` over scanned image files, decoded with :func:`load_rgb`.

    A file that loaded at scan time but fails now (changed, removed, made unreadable) yields a
    :class:`FailedSample`: the collate drops it and the run's skip log records it.

    Example:
        >>> ds = ImageListDataset([Path("cat/1.jpg")], np.array([0]))  # doctest: +SKIP
        >>> image, label = ds[0]  # doctest: +SKIP
    """

    def __init__(self, paths: list[Path], labels: np.ndarray, transform=None):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = self.load(self.paths[index])
        if isinstance(image, FailedSample):
            return image
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class ScannedFolderSplits:
    """Seeded, stratified train/val/test splits of a scanned ``{class}/*`` folder, and its datasets.

    For ImageDataModules that implement ``_scan_folder() -> ScanResult`` and have
    ``val_fraction``, ``test_fraction`` and ``seed`` hyperparameters (Cats-vs-Dogs, any folder).
    """

    @staticmethod
    def check_fractions(val_fraction: float, test_fraction: float) -> None:
        """Raise ``ValueError`` unless the fractions leave a non-empty train split."""
        if (
            not 0 < val_fraction < 1
            or not 0 <= test_fraction < 1
            or val_fraction + test_fraction >= 1
        ):
            raise ValueError(
                f"need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1; "
                f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
            )

    def _split(self) -> list[np.ndarray]:
        if self._parts is None:
            labels = self._scan_folder().labels
            v, t = self.hparams.val_fraction, self.hparams.test_fraction
            fractions = (1 - v - t, v, t) if t > 0 else (1 - v, v)
            self._parts = stratified_split(labels, fractions, self.hparams.seed)
        return self._parts

    def train_labels(self) -> np.ndarray:
        return np.asarray(self._scan_folder().labels, dtype=np.int64)[self._split()[0]]

    def _dataset(self, part: int, transform) -> ImageListDataset:
        scan, idx = self._scan_folder(), self._split()[part]
        paths, labels = scan.paths, np.asarray(scan.labels, dtype=np.int64)
        return ImageListDataset([paths[i] for i in idx], labels[idx], transform)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            self.train_set = self._dataset(0, self.train_transform())
            self.val_set = self._dataset(1, self.eval_transform())
        if stage in (None, "test"):
            if self.hparams.test_fraction == 0:
                raise ValueError(
                    "test_fraction is 0, so there is no test split; set test_fraction > 0"
                )
            self.test_set = self._dataset(2, self.eval_transform())


class CatsDogsDataModule(ScannedFolderSplits, ImageDataModule):
    """Cats vs Dogs from Microsoft's ``kagglecatsanddogs_5340.zip``, or your own ``{class}/*.jpg`` folder.

    The archive (25,000 photos in ``PetImages/Cat`` and ``PetImages/Dog``, some of them empty or
    broken) is downloaded to ``{root}/cats_dogs/``, sha256-verified and extracted safely. Every
    file is then decoded once: valid ones are listed in ``manifest.csv`` and the rest in
    ``skipped.csv`` with the reason (empty, truncated, undecodable, not an image file), both next
    to the images (or in ``scan_dir``). Grayscale, CMYK, palette, EXIF-rotated and PNG/GIF files
    named ``.jpg`` all load as upright RGB. The scan is cached and only redone when the folder
    changes. Splits are seeded and stratified.

    Args:
        root: where the archive goes and is extracted (``{root}/cats_dogs/PetImages``).
        download: fetch the archive (~825 MB, sha256-checked) when the images are missing.
        data_dir: use this folder of ``{class}/*`` images instead (2 or more class subfolders,
            classes sorted by folder name); nothing is downloaded.
        val_fraction, test_fraction: shares held out for validation and test (test may be 0).
        scan_dir: where ``manifest.csv``, ``skipped.csv`` and ``scan.json`` go (default: the
            image folder itself; set it when that folder is read-only).

    Example:
        >>> dm = CatsDogsDataModule(data_dir="my_pets", backbone="resnet18", weights=None)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit"); dm.class_names  # doctest: +SKIP
        ['cat', 'dog']
    """

    def __init__(
        self,
        *args,
        root: str = "data",
        download: bool = True,
        data_dir: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        scan_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.check_fractions(val_fraction, test_fraction)
        self.root = Path(root)
        self.image_folder = Path(data_dir) if data_dir else self.root / "cats_dogs" / "PetImages"
        self._scan: ScanResult | None = None
        self._parts: list[np.ndarray] | None = None

    @property
    def class_names(self) -> list[str]:
        if self.hparams.data_dir:
            return class_folders(self.hparams.data_dir)
        return list(PETIMAGES_CLASSES)

    def _have_images(self) -> bool:
        return all((self.image_folder / name).is_dir() for name in self.class_names)

    def prepare_data(self) -> None:
        if not self.hparams.data_dir and not self._have_images() and self.hparams.download:
            folder = self.root / "cats_dogs"
            archive = download_url(
                PETIMAGES_URL, folder / "kagglecatsanddogs_5340.zip", PETIMAGES_SHA256, "sha256"
            )
            extract_archive(archive, folder)
            if not self._have_images():
                raise DataError(
                    f"{archive} did not contain PetImages/Cat and PetImages/Dog; delete it and retry"
                )
        self._scan_folder()  # once, on one process: the other ranks read the cache in setup()

    def _scan_folder(self) -> ScanResult:
        if self._scan is None:
            if not self._have_images():
                if self.hparams.data_dir:
                    raise FileNotFoundError(
                        f"data_dir '{self.image_folder}' has no class subfolders {self.class_names}"
                    )
                hint = (
                    "call prepare_data() first (the Trainer does)"
                    if self.hparams.download
                    else "set download: true"
                )
                raise FileNotFoundError(
                    f"Cats vs Dogs images not found under '{self.image_folder}'; {hint}, or set "
                    f"data_dir to a folder of {{class}}/*.jpg images"
                )
            self._scan = scan_image_folder(self.image_folder, load_rgb, self.hparams.scan_dir)
            if self._scan.classes != self.class_names:
                raise DataError(
                    f"class folders changed while scanning {self.image_folder}; run again"
                )
            counts = np.bincount(self._scan.labels, minlength=self.num_classes)
            if counts.min() < 3:
                empty = [self.class_names[i] for i in np.flatnonzero(counts < 3)]
                raise DataError(
                    f"classes {empty} have fewer than 3 valid images in {self.image_folder} (see "
                    f"{Path(self.hparams.scan_dir or self.image_folder) / SKIPPED}); each class needs "
                    f"images for train, val and test"
                )
            note = "(cached scan)" if self._scan.cached else ""
            rank_zero_info(
                f"{self.image_folder}: {len(self._scan.valid)} valid images {dict(zip(self.class_names, counts.tolist(), strict=True))}, "
                f"{len(self._scan.skipped)} skipped ({_skip_summary(self._scan.skipped)}) {note}".rstrip()
            )
        return self._scan
