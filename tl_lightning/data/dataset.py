"""The datasets behind every datamodule: ``(image, label)`` samples that skip images failing to load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tl_lightning.data.decode import (
    DECODE_ERRORS,
    FailedSample,
    failure_reason,
    load_rgb,
    record_skip,
)
from tl_lightning.data.listing import IMAGE_EXTENSIONS, list_images
from tl_lightning.errors import DataError


class SkippingDataset(Dataset):
    """Base of datasets that decode files: ``load(path)`` gives an image or a :class:`FailedSample`.

    The datamodule sets ``skip_log`` (the run's CSV) and ``split`` before the loader is built.
    """

    skip_log: str | None = None
    split: str = "data"

    def load(self, path: str | Path) -> Image.Image | torch.Tensor | FailedSample:
        try:
            return load_rgb(path)
        except DECODE_ERRORS as e:
            reason = failure_reason(e)
            record_skip(self.skip_log, self.split, path, reason)
            return FailedSample(str(path), reason)



class ImageFilesDataset(SkippingDataset):
    """Every image file under a folder, transformed, as ``(image, path)``.

    An unreadable file yields a :class:`FailedSample`; use with :func:`skip_failed_collate`.

    Example:
        >>> ds = ImageFilesDataset("my_images/", transform=None)  # doctest: +SKIP
        >>> image, path = ds[0]  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, transform=None):
        self.files = list_images(root)
        if not self.files:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'; "
                f"point it at a folder that holds image files"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        image = self.load(path)
        if isinstance(image, FailedSample):
            return image
        return (self.transform(image) if self.transform else image), str(path)



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



class TensorImageDataset(Dataset):
    """``(transform(image), label)`` over an in-memory uint8 image tensor."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class LabelledFilesDataset(Dataset):
    """``(transform(load_rgb(file)), label)`` over a list of image files."""

    def __init__(self, files: Sequence[str | Path], labels: np.ndarray, transform=None):
        self.files, self.labels, self.transform = list(files), labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_rgb(self.files[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


