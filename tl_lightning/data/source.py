"""The one source contract: labelled images (items, labels, class names, how to load one item),
and :class:`ImageSource`, the config-level recipe that loads and splits them.

Every dataset has one loader that returns :class:`LabelledImages` (``digits.load_digits``,
``digits_m.load_digits_m``, ``cifar10.load_cifar10``, ``flowers102.load_flowers102``,
``scan.ScanResult.images`` for Cats-vs-Dogs and any class folder); datamodules compose them:
a classification datamodule (:class:`~tl_lightning.data.classification.ClassificationDataModule`)
splits one into train/val/test, the few-shot one splits its classes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tl_lightning.data.dataset import ImageDataset


@dataclass
class LabelledImages:
    """Labelled images from one dataset.

    Attributes:
        items: a uint8 ``[N, 3, H, W]`` tensor (in memory) or ``N`` image paths (decoded when read).
        labels: int64 ``[N]`` indices into ``class_names``.
        class_names: the name of each class id.
        splits: the dataset's official splits (``{"train": indices, "test": indices}``), if any.
        whole_image: small in-memory images that are resized whole, never center-cropped (at
            32 px every border pixel counts); ``False`` for photos in files.
        hflip: a mirrored image keeps its label (``False`` for digits: a mirrored digit is
            another symbol).

    Example:
        >>> images = LabelledImages(torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        ...                         np.array([0, 1, 0, 1]), ["a", "b"])
        >>> images.subset([1, 3]).labels.tolist(), len(images.dataset([0, 2]))
        ([1, 1], 2)
    """

    items: torch.Tensor | list[Path]
    labels: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    whole_image: bool = False
    hflip: bool = True

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.items) != len(self.labels):
            raise ValueError(f"{len(self.items)} items but {len(self.labels)} labels")
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(
            self.class_names
        ):
            raise ValueError(
                f"labels must be class ids 0..{len(self.class_names) - 1}, got "
                f"{self.labels.min()}..{self.labels.max()}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def _take(self, indices: np.ndarray):
        if isinstance(self.items, torch.Tensor):
            return self.items[torch.as_tensor(indices, dtype=torch.long)]
        return [self.items[i] for i in indices]

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        """These images at ``indices`` (official splits are dropped: they index the whole set)."""
        indices = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self, items=self._take(indices), labels=self.labels[indices], splits={}
        )

    def dataset(self, indices: Sequence[int] | np.ndarray | None = None, transform=None):
        """The :class:`ImageDataset` of the images at ``indices`` (all by default)."""
        if indices is None:
            return ImageDataset(self.items, self.labels, transform)
        indices = np.asarray(indices, dtype=np.int64)
        return ImageDataset(self._take(indices), self.labels[indices], transform)


class ImageSource:
    """How to get one dataset's :class:`LabelledImages` and its splits, from plain config values.

    The recipe a datamodule composes (``ClassificationDataModule`` and ``FewShotDataModule``
    take one, ``DomainAdaptationDataModule`` two): ``prepare()``
    downloads or scans once (from ``prepare_data``), ``class_names`` is known before loading,
    ``load(image_size)`` gives the images and ``splits(images, seed)`` the indices of the
    ``train``, ``val`` and ``test`` splits. A subclass stores each constructor argument under its
    own name, so :meth:`config` can write it back as ``class_path``/``init_args``.

    Example:
        >>> from tl_lightning.data.digits_m import DigitsMSource
        >>> source = DigitsMSource(part="target")
        >>> images = source.load(image_size=28)
        >>> {k: len(v) for k, v in source.splits(images, seed=0).items()}
        {'train': 538, 'val': 180, 'test': 178}
    """

    #: How :class:`~tl_lightning.data.few_shot.FewShotDataModule` splits this source's classes
    #: by default: ``None``: the first half of the class ids trains, the second half validates
    #: and tests (on disjoint halves of their images); ``(train, val)`` fractions: a seeded
    #: permutation of the classes, the rest tests.
    few_shot_classes: tuple[float, float] | None = None

    def prepare(self) -> None:
        """Download or scan what :meth:`load` reads (once, on one process)."""

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def load(self, image_size: int) -> LabelledImages:
        raise NotImplementedError

    def splits(self, images: LabelledImages, seed: int) -> dict[str, np.ndarray]:
        """``{"train": indices, "val": indices, "test": indices}`` into ``images``."""
        raise NotImplementedError

    def check_split(self, split: str, indices: np.ndarray) -> None:
        """Raise when a datamodule needs ``split`` and this source cannot give it (an empty
        split is fine by default)."""

    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of each file :meth:`load` left out (none by default)."""
        return []

    def config(self) -> dict:
        """``{"class_path": ..., "init_args": {...}}``: plain values, as a YAML config writes it."""
        params = inspect.signature(type(self).__init__).parameters
        args = {name: getattr(self, name) for name in list(params)[1:]}
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}
