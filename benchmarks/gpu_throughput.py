"""GPU training throughput: FineTuneModule in the Lightning Trainer vs a plain PyTorch loop.

ResNet-50 (random init: only the cost matters) fine-tuned end to end at 224 px, images per
second after warm-up, in fp32 and in mixed precision (``precision: mixed`` = bf16-mixed on
Ampere or newer, else 16-mixed with loss scaling). Both loops read the same pinned in-memory
batches of normalised images, use AdamW, channels_last and non-blocking copies, so the ratio
is the cost of the framework (Lightning loop, metrics, logging), not of data loading.

    python benchmarks/gpu_throughput.py                     # needs a CUDA GPU
    python benchmarks/gpu_throughput.py --batch 128 --steps 50
    python benchmarks/gpu_throughput.py --device cpu --arch resnet18 --size 32 --batch 8 \\
        --steps 3 --warmup 1                                  # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from _common import fmt, print_header, print_table, quiet_lightning
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import build_backbone
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.precision import mixed_precision_for

NUM_CLASSES = 100


def synthetic_loader(n: int, size: int, batch: int, pin: bool) -> DataLoader:
    """``n`` normalised random images in memory, shuffled, pinned when the target is a GPU."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return DataLoader(
        TensorDataset(images, labels),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        pin_memory=pin,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step (device synced)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and not self.start:
            sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.end = time.perf_counter()


def run_ours(args, precision: str, device: torch.device) -> float:
    """Images/s of FineTuneModule (all groups training) in the Lightning Trainer."""
    model = FineTuneModule(num_classes=NUM_CLASSES, backbone=args.arch, weights=None)
    timer = StepTimer(args.warmup, device)
    trainer = Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = synthetic_loader(args.images, args.size, args.batch, device.type == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    return args.steps * args.batch / (timer.end - timer.start)


def run_plain(args, precision: str, device: torch.device) -> float:
    """Images/s of the same network, optimizer and precision in a hand-written loop."""
    backbone = build_backbone(args.arch, weights=None)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(backbone.feature_dim, NUM_CLASSES))
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loader = synthetic_loader(args.images, args.size, args.batch, device.type == "cuda")
    step, start, total = 0, 0.0, args.warmup + args.steps
    while step < total:
        for x, y in loader:
            if step == args.warmup:
                sync(device)
                start = time.perf_counter()
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                loss = F.cross_entropy(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if step == total:
                break
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="resnet50", help="backbone name (default resnet50)")
    parser.add_argument("--size", type=int, default=224, help="image size in px")
    parser.add_argument("--batch", type=int, default=64, help="batch size")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps first (cudnn autotune)"
    )
    parser.add_argument("--images", type=int, default=512, help="in-memory dataset size")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_throughput.py needs a CUDA GPU: torch.cuda.is_available() is False here. "
            "Run it on a machine with an NVIDIA GPU (or --device cpu for a smoke test)."
        )
    if args.images < args.batch:
        raise SystemExit(f"--images ({args.images}) must be >= --batch ({args.batch})")
    quiet_lightning()
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")  # training speed only
    torch.backends.cudnn.benchmark = True
    print_header(f"GPU training throughput: {args.arch} fine-tuning at {args.size} px")
    precisions = ["32-true", mixed_precision_for(device)]
    if precisions[1] == precisions[0]:
        precisions = precisions[:1]
    results = {}
    for precision in precisions:
        for name, run in (
            ("plain PyTorch loop", run_plain),
            ("ours (FineTuneModule + Trainer)", run_ours),
        ):
            torch.manual_seed(0)
            results[name, precision] = run(args, precision, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = results["plain PyTorch loop", "32-true"]
    rows = []
    for (name, precision), ips in results.items():
        plain = results["plain PyTorch loop", precision]
        rows.append([name, precision, fmt(ips, 1), f"{ips / plain:.2f}x", f"{ips / base:.2f}x"])
    print_table(
        ["loop", "precision", "images/s", "vs plain, same precision", "vs plain fp32"], rows
    )
    print(
        f"\nbatch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up steps, "
        f"AdamW, channels_last, {args.images} pinned in-memory images"
    )


if __name__ == "__main__":
    sys.exit(main())
