"""Cats vs Dogs (Microsoft's PetImages archive) or any ``{class}/*.jpg`` folder, scanned once.

Every file is decoded once (full decode, as the loader will), the valid ones go to
``manifest.csv`` and the others to ``skipped.csv`` (path, reason), next to the data. The scan is
cached in ``scan.json`` and reused while the folder is unchanged (same files, sizes, mtimes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.decode import load_rgb
from tl_lightning.data.download import download_url, extract_archive
from tl_lightning.data.listing import class_folders
from tl_lightning.data.scan import (
    SKIPPED,
    ScannedSource,
    ScanResult,
    _skip_summary,
    scan_image_folder,
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

class CatsDogsSource(ScannedSource):
    """Cats vs Dogs as a source: Microsoft's PetImages archive (downloaded, verified, scanned
    once) or your own ``{class}/*.jpg`` folder (``data_dir``); see :class:`CatsDogsDataModule`.

    Example:
        >>> CatsDogsSource(root="data").class_names
        ['Cat', 'Dog']
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        data_dir: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        scan_dir: str | None = None,
    ):
        super().__init__(val_fraction, test_fraction, scan_dir)
        self.root, self.download, self.data_dir = root, download, data_dir

    @property
    def image_folder(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path(self.root) / "cats_dogs" / "PetImages"

    @property
    def class_names(self) -> list[str]:
        if self.data_dir:
            return class_folders(self.data_dir)
        return list(PETIMAGES_CLASSES)

    def _have_images(self) -> bool:
        return all((self.image_folder / name).is_dir() for name in self.class_names)

    def prepare(self) -> None:
        if not self.data_dir and not self._have_images() and self.download:
            folder = Path(self.root) / "cats_dogs"
            archive = download_url(
                PETIMAGES_URL, folder / "kagglecatsanddogs_5340.zip", PETIMAGES_SHA256, "sha256"
            )
            extract_archive(archive, folder)
            if not self._have_images():
                raise DataError(
                    f"{archive} did not contain PetImages/Cat and PetImages/Dog; delete it and retry"
                )
        super().prepare()

    def scan(self) -> ScanResult:
        if self._scan is None:
            if not self._have_images():
                if self.data_dir:
                    raise FileNotFoundError(
                        f"data_dir '{self.image_folder}' has no class subfolders {self.class_names}"
                    )
                hint = (
                    "call prepare_data() first (the Trainer does)"
                    if self.download
                    else "set download: true"
                )
                raise FileNotFoundError(
                    f"Cats vs Dogs images not found under '{self.image_folder}'; {hint}, or set "
                    f"data_dir to a folder of {{class}}/*.jpg images"
                )
            scan = scan_image_folder(self.image_folder, load_rgb, self.scan_dir)
            if scan.classes != self.class_names:
                raise DataError(
                    f"class folders changed while scanning {self.image_folder}; run again"
                )
            counts = np.bincount(scan.labels, minlength=len(self.class_names))
            if counts.min() < 3:
                empty = [self.class_names[i] for i in np.flatnonzero(counts < 3)]
                raise DataError(
                    f"classes {empty} have fewer than 3 valid images in {self.image_folder} (see "
                    f"{Path(self.scan_dir or self.image_folder) / SKIPPED}); each class needs "
                    f"images for train, val and test"
                )
            note = "(cached scan)" if scan.cached else ""
            rank_zero_info(
                f"{self.image_folder}: {len(scan.valid)} valid images {dict(zip(self.class_names, counts.tolist(), strict=True))}, "
                f"{len(scan.skipped)} skipped ({_skip_summary(scan.skipped)}) {note}".rstrip()
            )
            self._scan = scan
        return self._scan


class CatsDogsDataModule(ClassificationDataModule):
    """Cats vs Dogs from Microsoft's ``kagglecatsanddogs_5340.zip``, or your own ``{class}/*.jpg`` folder.

    The archive (25,000 photos and a ``Thumbs.db`` in ``PetImages/Cat`` and ``PetImages/Dog``, some empty or
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
        source = CatsDogsSource(root, download, data_dir, val_fraction, test_fraction, scan_dir)
        super().__init__(source, *args, **kwargs)
