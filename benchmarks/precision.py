"""CPU precision and memory layout: fp32 vs bf16-mixed, each with and without channels_last.

Speed: ResNet-50 (random init) and EfficientNet-Lite0 (offline ImageNet weights) at 224 px, as a
``FineTuneModule``; training step (forward, loss, backward, AdamW) and inference (eval mode,
``inference_mode``) under Lightning's own precision context (``MixedPrecision("bf16-mixed")``
is what ``Trainer(precision="bf16-mixed")`` wraps the forward in). Warm-up first, then timed
iterations until ``--iters`` or ``--max-seconds`` per setting, whichever comes first (bf16 can be
slow on CPUs without AVX-512 BF16 / AMX, so a fixed count could take many minutes).

Accuracy parity: a cached linear probe (``FeatureExtractionModule``) on the digits at 64 px in
the Trainer with ``precision="32-true"`` vs ``"bf16-mixed"``, over ``--parity-seeds`` seeds (each
seed its own split and head init; fresh cache folders), test accuracy per seed and the mean +- std
of the bf16 - fp32 difference.

    python benchmarks/precision.py
    python benchmarks/precision.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from _common import (
    add_threads_arg,
    apply_threads,
    bare_trainer_kwargs,
    fmt,
    forward_context,
    mean_std,
    print_header,
    print_table,
    quiet_lightning,
    timer,
)
from lightning.pytorch import Trainer, seed_everything

from tl_lightning.data import DigitsDataModule
from tl_lightning.modules import FeatureExtractionModule, FineTuneModule

SETTINGS = [  # (label, precision, channels_last)
    ("fp32", "32-true", False),
    ("fp32 + channels_last", "32-true", True),
    ("bf16-mixed", "bf16-mixed", False),
    ("bf16-mixed + channels_last", "bf16-mixed", True),
]
WEIGHTS = {"resnet50": None, "efficientnet_lite0": "DEFAULT"}


def images_per_s(model, x, y, precision: str, train: bool, args) -> float:
    """Warm-up, then timed iterations bounded by ``--iters`` and ``--max-seconds``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if train else None
    model.train(train)

    def step() -> None:
        if train:
            with forward_context(precision):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.inference_mode(), forward_context(precision):
                model(x)

    for _ in range(args.warmup):
        step()
    n, start = 0, time.perf_counter()
    while n < args.iters and (n == 0 or time.perf_counter() - start < args.max_seconds):
        step()
        n += 1
    return n * len(x) / (time.perf_counter() - start)


def speed_table(args) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    rows = []
    for backbone in args.models:
        for train in (True, False):
            base = None
            for label, precision, channels_last in SETTINGS:
                seed_everything(0, verbose=False)
                model = FineTuneModule(
                    num_classes=10,
                    backbone=backbone,
                    weights=WEIGHTS.get(backbone),
                    channels_last=channels_last,
                )
                if channels_last:
                    model.to(memory_format=torch.channels_last)  # what setup() does in the Trainer
                speed = images_per_s(model, x, y, precision, train, args)
                base = base or speed
                rows.append(
                    [
                        backbone,
                        "train" if train else "inference",
                        label,
                        f"{speed:.3g}",
                        f"{speed / base:.2f}x",
                    ]
                )
                print(f"  measured {rows[-1]}", flush=True)
    print()
    print_table(["model", "mode", "setting", "images/s", "ratio to fp32"], rows)


def parity_table(args) -> None:
    """Test accuracy of a cached linear probe in fp32 and bf16-mixed, per seed (split + head init)."""
    accs: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    seconds: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    for seed in range(args.parity_seeds):
        for precision in accs:
            seed_everything(seed, verbose=False)
            dm = DigitsDataModule(
                backbone="efficientnet_lite0",
                image_size=args.parity_size,
                batch_size=64,
                num_workers=0,
                seed=seed,
            )
            with tempfile.TemporaryDirectory() as cache:
                model = FeatureExtractionModule(
                    num_classes=10, backbone="efficientnet_lite0", cache_dir=cache
                )
                trainer = Trainer(
                    max_epochs=args.parity_epochs, precision=precision, **bare_trainer_kwargs()
                )
                with timer() as t:
                    trainer.fit(model, datamodule=dm)
                acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
            accs[precision].append(100 * acc)
            seconds[precision].append(t["s"])
    rows = [
        [
            p,
            " / ".join(fmt(a, 1) for a in accs[p]),
            mean_std(accs[p], 2),
            fmt(statistics.mean(seconds[p])),
        ]
        for p in accs
    ]
    diffs = [b - f for b, f in zip(accs["bf16-mixed"], accs["32-true"])]
    rows.append(["bf16 - fp32", " / ".join(f"{d:+.1f}" for d in diffs), mean_std(diffs, 2), ""])
    print(
        f"Accuracy parity: cached linear probe, digits at {args.parity_size} px, "
        f"EfficientNet-Lite0, {args.parity_epochs} epochs, seeds 0-{args.parity_seeds - 1} "
        "(split and head init; fit time includes caching):\n"
    )
    print_table(["precision", "test acc per seed (%)", "mean +- std", "fit s (mean)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=15.0, help="per setting")
    parser.add_argument("--parity-size", type=int, default=64)
    parser.add_argument("--parity-epochs", type=int, default=10)
    parser.add_argument("--parity-seeds", type=int, default=5)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    if args.quick:
        args.models, args.size, args.batch, args.iters = ["efficientnet_lite0"], 64, 4, 1
        args.parity_size, args.parity_epochs, args.parity_seeds = 32, 2, 2
    quiet_lightning()
    print_header("CPU precision and memory layout")
    if not args.skip_speed:
        print(
            f"speed: {args.size} px, batch {args.batch}, {args.warmup} warm-up, up to {args.iters} "
            f"timed iterations or {args.max_seconds:.0f} s per setting\n"
        )
        speed_table(args)
    if not args.skip_parity:
        parity_table(args)


if __name__ == "__main__":
    main()
