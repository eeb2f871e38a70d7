"""What the data are: images per split and per class, imbalance, image sizes, broken files."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from tl_lightning.data.decode import DECODE_ERRORS
from tl_lightning.data.source import ImageSource


@dataclass
class DataDescription:
    """Counts and sizes of a datamodule's data, read without training anything.

    ``image_sizes`` maps ``(width, height)`` to how many training images have it (the stored
    size, before the backbone's resize); ``broken`` lists ``(file, reason)`` from the folder scan.
    """

    splits: dict[str, int]
    class_names: list[str]
    train_per_class: list[int]
    image_sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    broken: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_train(self) -> int:
        return self.splits.get("train", 0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def imbalance(self) -> float:
        """Largest over smallest training class (``inf`` when a class has no training image)."""
        smallest = min(self.train_per_class)
        return float("inf") if smallest == 0 else max(self.train_per_class) / smallest

    @property
    def per_class_min(self) -> int:
        return min(self.train_per_class)

    def size_summary(self) -> str:
        """``64x64`` when every image has one size, else ``min..max`` widths and heights."""
        if not self.image_sizes:
            return "unknown"
        sizes = list(self.image_sizes)
        if len(sizes) == 1:
            return f"{sizes[0][0]}x{sizes[0][1]}"
        w = [s[0] for s in sizes]
        h = [s[1] for s in sizes]
        return f"{min(w)}..{max(w)} x {min(h)}..{max(h)} ({len(sizes)} sizes)"


def _stored_sizes(dataset) -> dict[tuple[int, int], int]:
    """``(width, height)`` counts of a dataset's stored images: file headers or an image tensor."""
    sizes: dict[tuple[int, int], int] = {}
    items = getattr(dataset, "items", None)  # ImageDataset: an [N, C, H, W] tensor or N paths
    if isinstance(items, torch.Tensor) and items.ndim == 4:
        n, _, h, w = items.shape
        return {(int(w), int(h)): int(n)}
    for path in items if items is not None else getattr(dataset, "files", []):
        try:
            with Image.open(path) as img:  # header only: no decode
                size = img.size
        except DECODE_ERRORS:  # broken since the scan: the scan report names it
            continue
        sizes[size] = sizes.get(size, 0) + 1
    return sizes


def describe_data(datamodule) -> DataDescription:
    """Describe a set-up :class:`~tl_lightning.data.base.ImageDataModule` (after ``setup("fit")``).

    Example:
        >>> from tl_lightning.data import DigitsDataModule
        >>> dm = DigitsDataModule(weights=None); dm.setup("fit")
        >>> d = describe_data(dm)
        >>> d.splits["train"], d.num_classes, d.size_summary()
        (1078, 10, '64x64')
    """
    splits = {}
    for name in ("train", "val", "test"):
        dataset = getattr(datamodule, f"{name}_set", None)
        if dataset is not None:
            splits[name] = len(dataset)
    counts = np.bincount(datamodule.train_labels(), minlength=datamodule.num_classes).tolist()
    source = getattr(datamodule, "source", None)  # folders: the scan's skipped files and reasons
    broken = source.skipped() if isinstance(source, ImageSource) else []
    return DataDescription(
        splits=splits,
        class_names=list(datamodule.class_names),
        train_per_class=counts,
        image_sizes=_stored_sizes(datamodule.train_set),
        broken=broken,
    )
