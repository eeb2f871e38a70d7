"""Offline data: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.source import ImageSource, LabelledImages
from tl_lightning.data.split import stratified_split


def load_digits_images(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """All digits as uint8 ``[N, 3, S, S]`` (upsampled bilinearly, grey copied to 3 channels) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, digits.target.astype(np.int64)


DIGITS_CLASSES = [str(i) for i in range(10)]


def load_digits(image_size: int) -> LabelledImages:
    """The digits as :class:`LabelledImages`, rendered at ``image_size`` (never flipped)."""
    images, labels = load_digits_images(image_size)
    return LabelledImages(images, labels, list(DIGITS_CLASSES), whole_image=True, hflip=False)


class DigitsSource(ImageSource):
    """scikit-learn's digits as a source: seeded stratified train/val/test ``split`` fractions.

    Example:
        >>> DigitsSource(split=(0.6, 0.2, 0.2)).class_names[:3]
        ['0', '1', '2']
    """

    def __init__(self, split: tuple[float, float, float] = (0.6, 0.2, 0.2)):
        if len(split) != 3:
            raise ValueError(f"split must be 3 fractions (train, val, test), got {list(split)}")
        self.split = tuple(split)

    @property
    def class_names(self) -> list[str]:
        return list(DIGITS_CLASSES)

    def load(self, image_size: int) -> LabelledImages:
        return load_digits(image_size)

    def splits(self, images: LabelledImages, seed: int) -> dict[str, np.ndarray]:
        parts = stratified_split(images.labels, self.split, seed=seed)
        return dict(zip(("train", "val", "test"), parts, strict=True))


class DigitsDataModule(ClassificationDataModule):
    """Handwritten digits bundled with scikit-learn: real data, no download, runs anywhere.

    Seeded stratified train/val/test split (default 60/20/20), images upsampled from 8x8 to
    ``image_size`` (default 64) and copied to 3 channels, normalised with the backbone's mean/std.
    Horizontal flips are never used (a mirrored digit is another symbol).

    Example:
        >>> dm = DigitsDataModule(backbone="efficientnet_lite0", image_size=64)
        >>> dm.setup("fit"); x, y = next(iter(dm.train_dataloader()))
        >>> x.shape
        torch.Size([64, 3, 64, 64])
    """

    default_workers = 0  # in memory: worker processes would cost more than they save

    def __init__(self, *args, image_size: int | None = 64, split: tuple[float, float, float] = (0.6, 0.2, 0.2), **kwargs):
        super().__init__(DigitsSource(split), *args, image_size=image_size, **kwargs)
