"""Offline "digits-M": scikit-learn digits blended with natural-photo patches, built like MNIST-M.

MNIST-M (Ganin et al. 2016) replaces each MNIST digit ``d`` by ``|patch - d|`` per colour channel,
where ``patch`` is a random crop of a colour photo. We do the same with the photos scikit-image
ships (no download), deterministically from a seed. The two halves of the 1,797 digits are
disjoint, so a source (plain digits, ``part="source", blend=False``) and a target (digits-M,
``part="target"``) never share a handwritten image.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import torch

from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.digits import DIGITS_CLASSES, DigitsSource, load_digits_images
from tl_lightning.data.source import LabelledImages
from tl_lightning.data.split import stratified_split

DEFAULT_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "coins",
    "camera",
)
PARTS = ("source", "target", "all")


@cache
def load_photo(name: str) -> np.ndarray:
    """A scikit-image bundled photo as uint8 ``[H, W, 3]`` (grey photos copied to 3 channels)."""
    import skimage.data

    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise ValueError(f"unknown scikit-image photo '{name}'; valid e.g.: {list(DEFAULT_PHOTOS)}")
    try:
        photo = np.asarray(loader())
    except ModuleNotFoundError as e:  # a few skimage images need the `pooch` download helper
        raise ValueError(
            f"scikit-image photo '{name}' is not bundled offline; pick one of {list(DEFAULT_PHOTOS)}"
        ) from e
    if photo.dtype != np.uint8:
        raise ValueError(
            f"scikit-image image '{name}' is {photo.dtype}, not a uint8 photo; pick one of {list(DEFAULT_PHOTOS)}"
        )
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    return np.ascontiguousarray(photo[..., :3])


def blend_with_photos(
    images: torch.Tensor, seed: int, photos: Sequence[str] = DEFAULT_PHOTOS
) -> torch.Tensor:
    """MNIST-M blend: ``|patch - digit|`` per channel, one random photo patch per image.

    ``images`` is uint8 ``[N, 3, S, S]``; image ``i`` always gets the same patch for a given
    ``seed`` (drawn in index order), so a dataset is reproducible and splits can be taken after.
    """
    if not photos:
        raise ValueError(
            "photos must name at least one scikit-image photo, e.g. ['astronaut', 'coffee']"
        )
    pics = [load_photo(name) for name in photos]
    n, _, size, _ = images.shape
    for name, pic in zip(photos, pics, strict=True):
        if min(pic.shape[:2]) < size:
            raise ValueError(
                f"photo '{name}' ({pic.shape[1]}x{pic.shape[0]}) is smaller than image_size={size}"
            )
    rng = np.random.default_rng(seed)
    which = rng.integers(len(pics), size=n)
    corner = rng.random((n, 2))
    digits = images.numpy().astype(np.int16)
    out = np.empty_like(digits)
    for i in range(n):
        pic = pics[which[i]]
        top = int(corner[i, 0] * (pic.shape[0] - size + 1))
        left = int(corner[i, 1] * (pic.shape[1] - size + 1))
        patch = pic[top : top + size, left : left + size].transpose(2, 0, 1).astype(np.int16)
        out[i] = np.abs(patch - digits[i])
    return torch.from_numpy(out.astype(np.uint8))


def domain_part(labels: np.ndarray, part: str, seed: int = 0) -> np.ndarray:
    """Indices of one of two disjoint, stratified halves of the digits (``all``: every index).

    The halves come from a fixed seed (not the datamodule's), so source and target datamodules
    with different seeds still never share an image.
    """
    if part not in PARTS:
        raise ValueError(f"unknown part '{part}'; valid: {list(PARTS)}")
    if part == "all":
        return np.arange(len(labels))
    source, target = stratified_split(labels, (0.5, 0.5), seed=seed)
    return source if part == "source" else target


def load_digits_m(
    image_size: int,
    part: str = "target",
    blend: bool = True,
    photos: Sequence[str] = DEFAULT_PHOTOS,
    photo_seed: int = 0,
) -> LabelledImages:
    """One half of the digits (``part``), blended with photo patches unless ``blend=False``."""
    images, labels = load_digits_images(image_size)
    if blend:  # blend all 1,797 first so an image's patch does not depend on `part`
        images = blend_with_photos(images, photo_seed, photos)
    keep = domain_part(labels, part)
    return LabelledImages(
        images[keep], labels[keep], list(DIGITS_CLASSES), whole_image=True, hflip=False
    )


class DigitsMSource(DigitsSource):
    """One half of the digits (``part``), blended with photo patches (digits-M) unless
    ``blend=False``, as a source; ``split``: train/val/test fractions within the half.

    Example:
        >>> target = DigitsMSource(part="target", photo_seed=0)
        >>> target.load(image_size=28).items.shape
        torch.Size([896, 3, 28, 28])
    """

    def __init__(
        self,
        part: str = "target",
        blend: bool = True,
        photos: list[str] | None = None,
        photo_seed: int = 0,
        split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    ):
        super().__init__(split)
        if part not in PARTS:
            raise ValueError(f"unknown part '{part}'; valid: {list(PARTS)}")
        self.part, self.blend = part, blend
        self.photos = list(photos) if photos is not None else list(DEFAULT_PHOTOS)
        self.photo_seed = photo_seed

    def load(self, image_size: int) -> LabelledImages:
        return load_digits_m(image_size, self.part, self.blend, self.photos, self.photo_seed)


class DigitsMDataModule(ClassificationDataModule):
    """Digits-M: scikit-learn digits on natural-photo patches (a MNIST-M-like target domain, offline).

    Args:
        part: which disjoint half of the 1,797 digits to use: ``source``, ``target`` or ``all``.
        blend: ``True`` for digits-M; ``False`` gives the plain digits of that half (the source domain).
        photos: scikit-image photos to take patches from.
        photo_seed: seeds the patch choice (which photo, where), independent of the split seed.
        split: train/val/test fractions within the half (stratified, seeded by ``seed``).
        image_size: digits are upsampled to this size before blending (default 28, the DANN CNN's).

    Example:
        >>> dm = DigitsMDataModule(backbone="dann_cnn", weights=None, part="target")
        >>> dm.setup("fit"); x, y = next(iter(dm.train_dataloader()))
        >>> x.shape
        torch.Size([64, 3, 28, 28])
    """

    default_workers = 0  # in memory: worker processes would cost more than they save

    def __init__(
        self,
        *args,
        part: str = "target",
        blend: bool = True,
        photos: list[str] | None = None,
        photo_seed: int = 0,
        image_size: int | None = 28,
        split: tuple[float, float, float] = (0.6, 0.2, 0.2),
        **kwargs,
    ):
        source = DigitsMSource(part, blend, photos, photo_seed, split)
        super().__init__(source, *args, image_size=image_size, **kwargs)
