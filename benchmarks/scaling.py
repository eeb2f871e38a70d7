"""Scaling with dataset size: time and memory of cached vs uncached feature extraction.

Synthetic images (generated on the fly from their index, so the images themselves take no RAM
and only the pipeline's memory shows), 10 classes, ``--size`` px, a frozen ``resnet18`` (random
init; only the cost matters here) and a linear head, ``FeatureExtractionModule`` in the Lightning
Trainer for ``--epochs`` epochs, with ``cache_features`` on and off. Each setting runs in its own
process; memory is sampled from ``/proc/self/status`` every 50 ms:

- peak RSS (``VmHWM``): everything resident, including pages of the memory-mapped cache file;
- peak anonymous RSS (``RssAnon``): heap memory, what must not grow with the dataset;
- peak file-backed RSS (``RssFile``): mapped file pages (cache, libraries), which the kernel can
  drop and re-read at will; bounded by the cache file size, never copied to the heap.

    python benchmarks/scaling.py                   # 1k, 10k, 50k images
    python benchmarks/scaling.py --quick           # 1k, 2k images
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    add_threads_arg,
    apply_threads,
    bare_trainer_kwargs,
    fmt,
    print_header,
    print_table,
)
from torch.utils.data import Dataset

BACKBONE = "resnet18"


class SyntheticImages(Dataset):
    """Deterministic uint8 images from their index; the class sets a per-channel brightness."""

    def __init__(self, n: int, size: int, offset: int = 0, transform=None):
        self.n, self.size, self.offset, self.transform = n, size, offset, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        i = index + self.offset
        label = i % 10
        g = torch.Generator().manual_seed(i)
        image = torch.randint(0, 128, (3, self.size, self.size), dtype=torch.uint8, generator=g)
        image[label % 3] += 12 * label  # a learnable signal
        return (self.transform(image) if self.transform else image), label


def status_kib(fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1])
    return out


class MemorySampler(threading.Thread):
    """Peak RssAnon / RssFile of this process, sampled every 50 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in status_kib(("RssAnon", "RssFile")).items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.05)


def worker(args) -> None:
    """One setting in this process; prints a JSON line with its measurements."""
    import logging
    import warnings

    from lightning.pytorch import Trainer, seed_everything

    from tl_lightning.data.base import ImageDataModule
    from tl_lightning.modules import FeatureExtractionModule

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class SyntheticDataModule(ImageDataModule):
        @property
        def class_names(self) -> list[str]:
            return [str(i) for i in range(10)]

        def train_labels(self) -> np.ndarray:
            return np.arange(args.n) % 10

        def setup(self, stage: str | None = None) -> None:
            tf = self.eval_transform(resize=False)
            if self.train_set is None:  # the module swaps in cached splits; keep them
                self.train_set = SyntheticImages(args.n, args.size, 0, tf)
                self.val_set = SyntheticImages(args.val, args.size, args.n, tf)

    sampler = MemorySampler()
    sampler.start()
    seed_everything(0, verbose=False)
    dm = SyntheticDataModule(
        backbone=BACKBONE, weights=None, image_size=args.size, batch_size=args.batch, num_workers=0
    )
    model = FeatureExtractionModule(
        num_classes=10,
        backbone=BACKBONE,
        weights=None,
        cache_features=args.mode == "cached",
        cache_dir=args.cache_dir,
        cache_dtype=args.cache_dtype,
    )
    trainer = Trainer(max_epochs=args.epochs, **bare_trainer_kwargs())
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    hwm = status_kib(("VmHWM",))["VmHWM"]
    cache_bytes = sum(p.stat().st_size for p in Path(args.cache_dir).rglob("*.npy"))
    acc = float(trainer.callback_metrics.get("val/acc", torch.tensor(float("nan"))))
    print(
        "RESULT "
        + json.dumps(
            dict(
                seconds=seconds,
                hwm_mib=hwm / 1024,
                anon_mib=sampler.peak["RssAnon"] / 1024,
                file_mib=sampler.peak["RssFile"] / 1024,
                cache_mib=cache_bytes / 2**20,
                val_acc=acc,
            )
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 2k images (smoke test)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--val", type=int, default=512, help="validation images")
    parser.add_argument("--cache-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    add_threads_arg(parser)
    args = parser.parse_args()
    threads = apply_threads(args.threads)
    if args.worker:
        worker(args)
        return

    if args.quick:
        args.sizes, args.epochs, args.val = [1000, 2000], 2, 256
    print_header("Scaling: cached vs uncached feature extraction")
    print(
        f"synthetic {args.size} px images, frozen {BACKBONE} (512-d features), "
        f"{args.epochs} epochs, batch {args.batch}, {args.val} validation images, "
        f"cache dtype {args.cache_dtype}; one process per row\n"
    )
    rows = []
    for n in args.sizes:
        seconds = {}
        for mode in ("uncached", "cached"):
            with tempfile.TemporaryDirectory() as cache:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    f"--n={n}",
                    f"--mode={mode}",
                    f"--cache-dir={cache}",
                    f"--size={args.size}",
                    f"--epochs={args.epochs}",
                    f"--batch={args.batch}",
                    f"--val={args.val}",
                    f"--cache-dtype={args.cache_dtype}",
                    f"--threads={threads}",
                ]
                env = dict(os.environ, TQDM_DISABLE="1")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
            r = json.loads(lines[-1][len("RESULT ") :])
            seconds[mode] = r["seconds"]
            rows.append(
                [
                    f"{n:,}",
                    mode,
                    fmt(r["seconds"]),
                    f"{seconds['uncached'] / r['seconds']:.1f}x",
                    fmt(r["hwm_mib"], 0),
                    fmt(r["anon_mib"], 0),
                    fmt(r["file_mib"], 0),
                    fmt(r["cache_mib"], 1) if mode == "cached" else "-",
                    fmt(100 * r["val_acc"], 1),
                ]
            )
            print(f"  measured {rows[-1]}", flush=True)
    print()
    print_table(
        [
            "images",
            "mode",
            "fit s",
            "speed-up vs uncached",
            "peak RSS MiB",
            "peak anon RSS MiB",
            "peak file RSS MiB",
            "cache file MiB",
            "val acc (%)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
