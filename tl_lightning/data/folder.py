"""Images from plain folders: a robust RGB loader and a dataset of files for prediction."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate

from tl_lightning.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully as RGB, honouring EXIF rotation (grayscale, CMYK, palette all work).

    The format is sniffed from the bytes, not the extension, so a PNG named ``.jpg`` loads.
    Raises ``OSError``/``ValueError`` (PIL's) for empty, truncated or undecodable files.
    """
    with Image.open(path) as img:
        img.load()  # full decode now: truncation must fail here, not later in a worker
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, by extension)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFilesDataset(Dataset):
    """Every image file under a folder, transformed, as ``(image, path)``; unreadable ones yield None.

    Use with :func:`skip_failed_collate`, which drops the Nones and logs what was skipped.
    """

    def __init__(self, root: str | Path, transform=None):
        self.files = list_images(root)
        if not self.files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image = load_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("skipping unreadable image %s: %s", path, e)
            return None
        return (self.transform(image) if self.transform else image), str(path)


def skip_failed_collate(samples: list):
    """default_collate over the samples that loaded; an all-failed batch becomes an empty list."""
    good = [s for s in samples if s is not None]
    return default_collate(good) if good else []
