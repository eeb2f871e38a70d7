"""The one dataset class: ``(image, target)`` over in-memory images or image files.

A file that fails to decode is never replaced by another sample (whose label would then be
silently wrong): the dataset returns a :class:`~tl_lightning.data.decode.FailedSample`, the
collate drops it from its batch and the run's skip log (``skipped_images.csv``) records it.
"""

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


class ImageDataset(Dataset):
    """``(transform(image), label)`` for ``items``: a uint8 ``[N, 3, H, W]`` tensor or image paths.

    Files are decoded with :func:`~tl_lightning.data.decode.load_rgb` when read; one that fails
    yields a :class:`FailedSample` and a line in ``skip_log`` (set with ``split`` by the
    datamodule before its loader is built). ``labels`` are class indices (or any per-item
    target, such as the path for predictions).

    Example:
        >>> ds = ImageDataset(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), np.array([0, 1]))
        >>> image, label = ds[1]
        >>> tuple(image.shape), label
        ((3, 8, 8), 1)
    """

    skip_log: str | None = None
    split: str = "data"

    def __init__(self, items: torch.Tensor | Sequence[str | Path], labels, transform=None):
        if len(items) != len(labels):
            raise ValueError(f"{len(items)} items but {len(labels)} labels")
        self.items = items if isinstance(items, torch.Tensor) else [Path(p) for p in items]
        self.labels = labels
        self.transform = transform

    # the items by their kind, for readers that know which they hold
    @property
    def images(self) -> torch.Tensor:
        return self.items

    @images.setter
    def images(self, value: torch.Tensor) -> None:
        self.items = value

    @property
    def paths(self) -> list[Path]:
        return self.items

    def __len__(self) -> int:
        return len(self.items)

    def load(self, path: str | Path) -> Image.Image | torch.Tensor | FailedSample:
        """The decoded image, or a :class:`FailedSample` recorded in the skip log."""
        try:
            return load_rgb(path)
        except DECODE_ERRORS as e:
            reason = failure_reason(e)
            record_skip(self.skip_log, self.split, path, reason)
            return FailedSample(str(path), reason)

    def __getitem__(self, index: int):
        item = self.items[index]
        image = item if isinstance(item, torch.Tensor) else self.load(item)
        if isinstance(image, FailedSample):
            return image
        label = self.labels[index]
        label = int(label) if isinstance(label, int | np.integer) else label
        return (self.transform(image) if self.transform else image), label


class ImageFilesDataset(ImageDataset):
    """Every image file under a folder, transformed, as ``(image, path)`` (for predictions).

    Example:
        >>> ds = ImageFilesDataset("my_images/", transform=None)  # doctest: +SKIP
        >>> image, path = ds[0]  # doctest: +SKIP
    """

    def __init__(self, root: str | Path, transform=None):
        files = list_images(root)
        if not files:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'; "
                f"point it at a folder that holds image files"
            )
        super().__init__(files, [str(p) for p in files], transform)

    @property
    def files(self) -> list[Path]:
        return self.items
