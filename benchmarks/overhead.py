"""Framework overhead: FineTuneModule in the Lightning Trainer vs a hand-written PyTorch loop.

Both run the same steps: the same model (a ``FineTuneModule`` built with seed 0; the hand loop
calls it as a plain ``nn.Module``), AdamW at 1e-3 over all parameters, the same in-memory batches
(a shuffled ``TensorDataset`` of normalised images, batch 64, no workers), the same precision and
channels_last. The clock runs from the end of step ``warmup`` to the end of the last step, so it
covers data fetching, forward, backward, the optimizer and every per-step hook, but not process
start, model building or Trainer setup (reported separately as end-to-end seconds).

Variants, interleaved ``repeats`` times (median reported, the cores are shared):
- hand-written loop;
- Lightning bare: no progress bar, logger, checkpointing or model summary;
- Lightning defaults: progress bar, default logger, ModelCheckpoint, model summary.

    python benchmarks/overhead.py                 # resnet18 (random init), 64 px, batch 64
    python benchmarks/overhead.py --quick
    python benchmarks/overhead.py --backbone efficientnet_lite0 --weights DEFAULT
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
    print_header,
    print_table,
    quiet_lightning,
    timer,
)
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.modules import FineTuneModule


class StepClock(Callback):
    """Wall-clock time from the end of batch ``warmup - 1`` to the end of the last batch."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if batch_idx == self.warmup - 1:
            self.start = now
        elif batch_idx >= self.warmup:
            self.end, self.steps = now, batch_idx + 1 - self.warmup


def make_model(args) -> FineTuneModule:
    seed_everything(0, verbose=False)
    return FineTuneModule(
        num_classes=10, backbone=args.backbone, weights=args.weights, channels_last=True
    )


def make_loader(data: TensorDataset, batch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, generator=generator)


def run_hand(args, data: TensorDataset) -> tuple[float, float]:
    """(images/s in the timed window, end-to-end seconds) of the plain PyTorch loop."""
    model = make_model(args)
    total_start = time.perf_counter()
    model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = end = 0.0
    steps = args.warmup + args.steps
    for i, (x, y) in enumerate(make_loader(data, args.batch)):
        with forward_context(args.precision):
            logits = model(x)  # ClassifierModule.forward makes x channels_last, as in Lightning
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == args.warmup - 1:
            start = time.perf_counter()
        if i == steps - 1:
            end = time.perf_counter()
            break
    return args.steps * args.batch / (end - start), end - total_start


def run_lightning(args, data: TensorDataset, defaults: bool) -> tuple[float, float]:
    """(images/s in the timed window, end-to-end fit seconds) of FineTuneModule in the Trainer."""
    model = make_model(args)
    clock = StepClock(args.warmup)
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as root:
        if defaults:
            kwargs = dict(accelerator="cpu", devices=1, default_root_dir=root)
        else:
            kwargs = bare_trainer_kwargs()
        trainer = Trainer(
            max_epochs=1,
            limit_train_batches=steps,
            limit_val_batches=0,
            precision=args.precision,
            callbacks=[clock],
            **kwargs,
        )
        with timer() as t:
            trainer.fit(model, train_dataloaders=make_loader(data, args.batch))
    if clock.steps != args.steps:
        raise RuntimeError(f"expected {args.steps} timed steps, got {clock.steps}")
    return args.steps * args.batch / (clock.end - clock.start), t["s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, 1 repeat (smoke test)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--weights", default=None, help="backbone weights (default: random init)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.size = 4, 2, 1, 32
    quiet_lightning()
    print_header("Framework overhead: Lightning Trainer vs hand-written PyTorch loop")
    print(
        f"{args.backbone} (weights={args.weights}), {args.size} px, batch {args.batch}, "
        f"{args.precision} + channels_last, AdamW, {args.warmup} warm-up + {args.steps} timed steps, "
        f"{args.repeats} interleaved repeats (median)\n"
    )
    n = (args.warmup + args.steps) * args.batch
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(n, 3, args.size, args.size, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )
    names = ["hand-written PyTorch loop", "Lightning, bare", "Lightning, default callbacks"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    runs = [
        lambda: run_hand(args, data),
        lambda: run_lightning(args, data, defaults=False),
        lambda: run_lightning(args, data, defaults=True),
    ]
    for r in range(args.repeats):
        for name, run in zip(names, runs, strict=True):
            results[name].append(run())
            print(f"  repeat {r + 1}: {name}: {results[name][-1][0]:.1f} images/s", flush=True)
    base = statistics.median(r[0] for r in results[names[0]])
    rows = []
    for name in names:
        speeds = [r[0] for r in results[name]]
        med = statistics.median(speeds)
        rows.append(
            [
                name,
                fmt(med, 1),
                f"{min(speeds):.1f}-{max(speeds):.1f}",
                f"{med / base:.3f}x",
                fmt(statistics.median(r[1] for r in results[name])),
            ]
        )
    print_table(
        ["loop", "images/s (median)", "images/s range", "ratio to hand loop", "end-to-end s"], rows
    )


if __name__ == "__main__":
    main()
