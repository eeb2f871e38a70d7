"""Any labelled folder of images, ``root/{class}/*``: scanned once, broken files skipped, split."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.decode import load_rgb
from tl_lightning.data.listing import IMAGE_EXTENSIONS, class_folders
from tl_lightning.data.scan import (
    SKIPPED,
    ScannedSource,
    ScanResult,
    _skip_summary,
    scan_image_folder,
)
from tl_lightning.errors import DataError

log = logging.getLogger(__name__)


def _has_image_files(folder: Path) -> bool:
    return any(
        p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        for p in folder.rglob("*")
    )


class ImageFolderSource(ScannedSource):
    """Any ``root/{class}/*`` folder as a source: scanned once, broken files skipped, class
    folders without image files left out with a warning (see :class:`ImageFolderDataModule`).

    Example:
        >>> ImageFolderSource("my_images", val_fraction=0.2).class_names  # doctest: +SKIP
        ['cat', 'dog', 'fox']
    """

    few_shot_classes = (0.6, 0.2)  # FewShotDataModule: a seeded 60/20/20 split of the classes

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        scan_dir: str | None = None,
    ):
        super().__init__(val_fraction, test_fraction, scan_dir)
        self.root = root

    @cached_property
    def _classes(self) -> list[str]:
        """Non-empty class subfolders; empty ones are left out with a warning."""
        root = Path(self.root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder root='{root}' does not exist; point data.init_args.root at a "
                f"folder with one subfolder of images per class"
            )
        folders = class_folders(root)
        classes = [c for c in folders if _has_image_files(root / c)]
        empty = sorted(set(folders) - set(classes))
        if empty:
            rank_zero_warn(
                f"{root}: ignoring {len(empty)} class folder(s) without image files: {empty}"
            )
        if len(classes) < 2:
            raise DataError(
                f"'{root}' has {len(classes)} class folder(s) with images {classes}"
                f"{f' (empty: {empty})' if empty else ''}; a classifier needs at least 2 "
                f"subfolders of images, e.g. {root}/cat/*.jpg and {root}/dog/*.jpg"
            )
        return classes

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def scan(self) -> ScanResult:
        if self._scan is not None:
            return self._scan
        root = Path(self.root)
        scan = scan_image_folder(root, load_rgb, self.scan_dir, classes=self._classes)
        report = Path(self.scan_dir or root) / SKIPPED
        counts = np.bincount(scan.labels, minlength=len(self.class_names))
        if not scan.valid:
            raise DataError(
                f"none of the {len(scan.skipped)} files under '{root}' is a readable image "
                f"({_skip_summary(scan.skipped)}; reasons in {report}); fix or replace the files"
            )
        need = 3 if self.test_fraction > 0 else 2  # one image per split at least
        short = [self.class_names[i] for i in np.flatnonzero(counts < need)]
        if short:
            raise DataError(
                f"class folder(s) {short} under '{root}' have fewer than {need} "
                f"readable images ({dict(zip(self.class_names, counts.tolist(), strict=True))}; "
                f"skipped files and reasons in {report}); add images or remove those folders"
            )
        rank_zero_info(
            f"{root}: {len(scan.valid)} images "
            f"{dict(zip(self.class_names, counts.tolist(), strict=True))}, {len(scan.skipped)} "
            f"skipped ({_skip_summary(scan.skipped)}; {report})"
        )
        self._scan = scan
        return scan


class ImageFolderDataModule(ClassificationDataModule):
    """A folder of ``{class}/*`` images: one class per subfolder, seeded stratified splits.

    Every file is decoded once (cached in ``manifest.csv``/``skipped.csv``/``scan.json`` next to
    the images or in ``scan_dir``): empty, truncated, unreadable and non-image files are skipped
    and listed with the reason. A class folder without image files is left out with a warning; a
    class whose every image is broken, or a folder with no usable image, is a :class:`DataError`.
    Images that break later (during training) are dropped from their batch and reported.

    Args:
        root: the folder holding one subfolder per class (sorted names are the classes).
        val_fraction, test_fraction: shares held out for validation and test (test may be 0).
        scan_dir: where the scan results go (default: ``root``; set it when ``root`` is read-only).

    Example:
        >>> dm = ImageFolderDataModule("my_images", backbone="resnet18", weights=None)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit"); dm.class_names  # doctest: +SKIP
        ['cat', 'dog', 'fox']
    """

    def __init__(
        self,
        root: str,
        *args,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        scan_dir: str | None = None,
        **kwargs,
    ):
        source = ImageFolderSource(root, val_fraction, test_fraction, scan_dir)
        super().__init__(source, *args, **kwargs)
