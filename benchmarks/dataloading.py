"""Loader vs training step: is a 224 px fine-tune on this machine input-bound or compute-bound?

JPEG files are written to a temporary folder from scikit-image's bundled photos (random crops
and sizes, quality 90), then read back through a ``DataLoader`` (batch ``--batch``, workers
0/1/2) with the library's ``basic`` train augmentation at 224 px (RandomResizedCrop + flip +
normalise, ``tl_lightning.data.transforms.train_transform``):

- PIL: the library's PIL path (full decode, EXIF, RGB) + transforms v2;
- the library's default ``tl_lightning.data.decode.load_rgb``: JPEGs decoded by TorchCodec
  (extra ``fast``) to a uint8 tensor, the same transforms v2 on tensors;
- ``torchvision.io.decode_jpeg`` (deprecated since torchvision 0.29) + the same transforms v2;
- TorchCodec, batch normalise: crop/flip per item on uint8, ``ToDtype`` + ``Normalize`` once
  per batch in the collate function (less per-item Python and float work; not in the library).

The clock runs from the first batch to the end of the pass (worker start-up excluded). The
training step is an EfficientNet-Lite0 ``FineTuneModule`` step (forward, backward, AdamW) at
224 px in fp32 + channels_last on in-memory tensors. Loader rate / step rate > 1 means the loader
keeps up with training.

    python benchmarks/dataloading.py
    python benchmarks/dataloading.py --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import add_threads_arg, apply_threads, fmt, print_header, print_table, quiet_lightning
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from tl_lightning.backbones import resolve_data_config
from tl_lightning.data import decode
from tl_lightning.data.decode import load_rgb
from tl_lightning.data.listing import list_images
from tl_lightning.data.transforms import train_transform
from tl_lightning.modules import FineTuneModule

BACKBONE, SIZE = "efficientnet_lite0", 224


def write_jpegs(folder: Path, n: int) -> None:
    """``n`` JPEGs (about 300-640 px) cut from scikit-image's bundled colour photos."""
    from skimage import data

    photos = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(300, 641))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        crop = crop.resize((side, max(1, int(side * ch / cw))), Image.BILINEAR)
        crop.save(folder / f"img_{i:05d}.jpg", quality=90)


class LibraryFiles(Dataset):
    """The library's loader, ``load_rgb``: TorchCodec for JPEGs when installed."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.files[i])), 0


class PILFiles(LibraryFiles):
    """The library's PIL path (what ``TL_LIGHTNING_DECODER=pil`` or no torchcodec gives)."""

    def __getitem__(self, i: int):
        with Image.open(self.files[i]) as img:
            img.load()
            return self.transform(ImageOps.exif_transpose(img).convert("RGB")), 0


class TorchvisionFiles(LibraryFiles):
    def __getitem__(self, i: int):
        image = decode_jpeg(read_file(str(self.files[i])), mode=ImageReadMode.RGB)
        return self.transform(image), 0


class NormaliseCollate:
    """Stack uint8 crops, then convert and normalise the whole batch at once."""

    def __init__(self, mean, std):
        self.normalise = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        )

    def __call__(self, samples):
        images, labels = default_collate(samples)
        return self.normalise(images), labels


def loader_rate(dataset: Dataset, batch: int, workers: int, collate=None) -> float:
    loader = DataLoader(
        dataset, batch_size=batch, num_workers=workers, shuffle=True, collate_fn=collate
    )
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    n, start = 0, time.perf_counter()
    for x, _ in it:
        n += len(x)
    return n / (time.perf_counter() - start)


def step_rate(batch: int, iters: int) -> float:
    torch.manual_seed(0)
    model = FineTuneModule(num_classes=10, backbone=BACKBONE, channels_last=True)
    model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, SIZE, SIZE), torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return iters * batch / (time.perf_counter() - start)


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision.io's row
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few files, workers 0/1 (smoke test)")
    parser.add_argument("--files", type=int, default=320)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--step-iters", type=int, default=3)
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    if args.quick:
        args.files, args.batch, args.workers, args.step_iters = 48, 8, [0, 1], 1
    quiet_lightning()
    print_header("Data loading vs training step")
    cfg = resolve_data_config(BACKBONE, "DEFAULT")
    tf = train_transform(cfg, SIZE, augment="basic")
    crop_only = v2.Compose(
        [v2.ToImage(), v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()]
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), args.files)
        files = list_images(tmp)
        mib = sum(f.stat().st_size for f in files) / 2**20
        print(
            f"{len(files)} JPEGs ({mib:.1f} MiB), batch {args.batch}, augment 'basic' at {SIZE} px, "
            f"EfficientNet-Lite0 fp32 + channels_last train step\n"
        )
        step = step_rate(args.batch, args.step_iters)
        rows = [["train step alone (in-memory batch)", "-", fmt(step, 1), "1.00x"]]
        fast = "TorchCodec" if decode.fast_jpeg_decoder() else "PIL (torchcodec missing)"
        variants = [
            ("PIL + transforms v2", PILFiles(files, tf), None),
            (f"library load_rgb ({fast}) + transforms v2", LibraryFiles(files, tf), None),
            ("torchvision decode_jpeg + transforms v2", TorchvisionFiles(files, tf), None),
            (
                f"load_rgb ({fast}) + crop per item, normalise per batch",
                LibraryFiles(files, crop_only),
                NormaliseCollate(list(cfg.mean), list(cfg.std)),
            ),
        ]
        for name, dataset, collate in variants:
            for w in args.workers:
                rate = loader_rate(dataset, args.batch, w, collate)
                rows.append([f"loader: {name}", w, fmt(rate, 1), f"{rate / step:.2f}x"])
                print(f"  measured {rows[-1]}", flush=True)
    print()
    print_table(["stage", "workers", "images/s", "ratio to train step"], rows)


if __name__ == "__main__":
    main()
