"""Images from plain folders: a robust RGB loader, skip markers for images that fail to decode.

A sample that fails to decode is never replaced by another one (whose label would then be
silently wrong): the dataset returns a :class:`FailedSample`, :func:`skip_failed_collate` drops
it from the batch, and the failure is appended to a per-run skip log (``skipped_images.csv`` in
the run folder) that :class:`~tl_lightning.callbacks.skipped_images.SkippedImagesReport` sums up.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, default_collate

from tl_lightning.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SKIP_LOG_NAME = "skipped_images.csv"
SKIP_LOG_FIELDS = ("split", "path", "reason")
# Everything PIL raises on a bad file: OSError (truncated, unreadable), SyntaxError (bad PNG
# chunks), ValueError/TypeError/struct errors (bad headers), decompression bombs.
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    RuntimeError,
    Image.DecompressionBombError,
)


JPEG_MAGIC = b"\xff\xd8\xff"
DECODER_ENV = "TL_LIGHTNING_DECODER"  # "pil" turns the tensor JPEG path off


@functools.cache
def fast_jpeg_decoder() -> Callable | None:
    """TorchCodec's JPEG decoder (bytes -> uint8 ``[3, H, W]``, EXIF applied), or None for PIL.

    None when torchcodec is not installed (extra ``fast``), cannot load (built for another torch),
    or ``TL_LIGHTNING_DECODER=pil`` is set (e.g. for transforms that only take PIL images).
    """
    if os.environ.get(DECODER_ENV, "").lower() == "pil":
        return None
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # missing, or a binary mismatch: PIL decodes everything
        return None
    return decode_jpeg


def load_rgb(path: str | Path) -> Image.Image | torch.Tensor:
    """Decode an image fully as RGB, honouring EXIF rotation (grayscale, CMYK, palette all work).

    JPEGs decode straight to a uint8 ``[3, H, W]`` tensor with TorchCodec when it is installed
    (faster than PIL, and the transforms v2 that follow run on tensors); everything else, and any
    JPEG TorchCodec rejects, goes through PIL. The format is sniffed from the bytes, not the
    extension, so a PNG named ``.jpg`` loads. Raises ``OSError``/``ValueError`` (PIL's) for empty,
    truncated or undecodable files.
    """
    data = Path(path).read_bytes()
    decode = fast_jpeg_decoder()
    if decode is not None and data[:3] == JPEG_MAGIC:
        try:
            return decode(data, mode="RGB")
        except Exception:  # noqa: BLE001 -- truncated, corrupt or unsupported: PIL decides and names why
            pass
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # full decode now: truncation must fail here, not later in a worker
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def failure_reason(exc: BaseException) -> str:
    """A one-line, CSV-safe reason such as ``truncated (OSError: image file is truncated)``."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if isinstance(exc, PermissionError):
        kind = "unreadable"
    elif "truncated" in text.lower():
        kind = "truncated"
    else:
        kind = "undecodable"
    return f"{kind} ({text})"


@dataclass(frozen=True)
class FailedSample:
    """Returned by a dataset in place of a sample whose image failed to load; collates drop it."""

    path: str
    reason: str


def record_skip(skip_log: str | Path | None, split: str, path: str | Path, reason: str) -> None:
    """Warn and append ``split, path, reason`` to ``skip_log`` (safe from many worker processes).

    One ``O_APPEND`` write per line: lines from concurrent workers and ranks never interleave.
    """
    log.warning("skipping unreadable image %s: %s", path, reason)
    if skip_log is None:
        return
    buf = io.StringIO()
    csv.writer(buf).writerow([split, str(path), reason])
    fd = os.open(skip_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, buf.getvalue().encode("utf-8"))
    finally:
        os.close(fd)


def read_skip_log(skip_log: str | Path) -> list[dict[str, str]]:
    """The rows ``{split, path, reason}`` of a skip log (empty when it does not exist)."""
    try:
        with open(skip_log, newline="", encoding="utf-8") as f:
            return [dict(zip(SKIP_LOG_FIELDS, row, strict=False)) for row in csv.reader(f) if row]
    except FileNotFoundError:
        return []


def is_failed(sample) -> bool:
    """True for a sample a dataset could not load (``None`` or a :class:`FailedSample`)."""
    return sample is None or isinstance(sample, FailedSample)


def skip_failed_collate(samples: list):
    """default_collate over the samples that loaded; an all-failed batch becomes an empty list."""
    good = [s for s in samples if not is_failed(s)]
    return default_collate(good) if good else []


class SkipFailedDataLoader(DataLoader):
    """A DataLoader that never yields an empty batch (every image in it failed to load).

    Raises :class:`DataError` when a whole pass over the data produced no image at all.
    """

    def __iter__(self) -> Iterator:
        dropped, yielded = 0, 0
        for batch in super().__iter__():
            if isinstance(batch, list) and not batch:
                dropped += 1
                continue
            yielded += 1
            yield batch
        # a whole pass, not the rest of an epoch resumed after its last good batch
        if dropped and not yielded and dropped >= len(self):
            inner = getattr(self.dataset, "dataset", self.dataset)  # SeededSamples wraps it
            raise DataError(
                f"every image in this {type(inner).__name__} ({len(self.dataset)} samples) "
                f"failed to load; see the warnings above or {SKIP_LOG_NAME} in the run folder "
                f"and fix or replace the files"
            )
