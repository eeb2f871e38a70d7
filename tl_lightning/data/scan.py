"""Scan a ``{class}/*`` folder once: which files decode (the manifest) and which not, and why.

Every file is decoded once (full decode, as the loader will), the valid ones go to
``manifest.csv`` and the others to ``skipped.csv`` (path, reason), next to the data. The scan is
cached in ``scan.json`` and reused while the folder is unchanged (same files, sizes, mtimes).
"""


from __future__ import annotations

import csv
import hashlib
import json
import os
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

from tl_lightning.data.decode import failure_reason
from tl_lightning.data.listing import IMAGE_EXTENSIONS, class_folders
from tl_lightning.data.source import ImageSource, LabelledImages
from tl_lightning.data.split import stratified_split
from tl_lightning.errors import DataError
from tl_lightning.file_io import atomic_write_text

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

    def images(self) -> LabelledImages:
        """The files that decoded, as the source a datamodule splits."""
        return LabelledImages(self.paths, np.asarray(self.labels, dtype=np.int64), self.classes)



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
    atomic_write_text(out_dir / MANIFEST, manifest, "scan manifest")
    atomic_write_text(out_dir / SKIPPED, skipped, "scan report")
    # last: marks the scan complete
    atomic_write_text(out_dir / SCAN_INFO, lambda f: json.dump(info, f, indent=1), "scan info")


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


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise ``ValueError`` unless the fractions leave a non-empty train split."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"need 0 < val_fraction, 0 <= test_fraction and val_fraction + test_fraction < 1; "
            f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


class ScannedSource(ImageSource):
    """A source read from a scanned ``{class}/*`` folder (only files that decode), split by
    seeded, stratified ``val_fraction``/``test_fraction``. Subclasses implement :meth:`scan`."""

    def __init__(self, val_fraction: float = 0.1, test_fraction: float = 0.1, scan_dir: str | None = None):
        check_fractions(val_fraction, test_fraction)
        self.val_fraction, self.test_fraction, self.scan_dir = val_fraction, test_fraction, scan_dir
        self._scan: ScanResult | None = None

    def scan(self) -> ScanResult:
        raise NotImplementedError

    def prepare(self) -> None:
        self.scan()  # once, on one process: the other ranks read the cache in setup()

    def load(self, image_size: int) -> LabelledImages:
        return self.scan().images()

    def splits(self, images: LabelledImages, seed: int) -> dict[str, np.ndarray]:
        v, t = self.val_fraction, self.test_fraction
        fractions = (1 - v - t, v, t) if t > 0 else (1 - v, v)
        parts = stratified_split(images.labels, fractions, seed)
        return dict(zip(("train", "val", "test"), [*parts, np.zeros(0, np.int64)][:3], strict=True))

    def check_split(self, split: str, indices: np.ndarray) -> None:
        if split == "test" and self.test_fraction == 0:
            raise ValueError("test_fraction is 0, so there is no test split; set test_fraction > 0")

    def skipped(self) -> list[tuple[str, str]]:
        """The scan's skipped files (absolute paths) and reasons, once scanned."""
        scan = self._scan
        return [(str(Path(scan.folder) / rel), why) for rel, why in scan.skipped] if scan else []
