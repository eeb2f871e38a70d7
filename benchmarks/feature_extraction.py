"""Linear probe: tl-lightning's cached FeatureExtractionModule vs the seeds' recompute-every-epoch loop.

Protocol (same for both): scikit-learn digits at 64 px, stratified 60/20/20 split (seed 0, 1077
training images), offline ImageNet EfficientNet-Lite0, a linear head, AdamW at 1e-3, batch 64,
channels_last, seed 0, and one precision for both (``--precision``: ``32-true`` or ``bf16-mixed``;
the seeds' loop then runs its backbone and head forward under the same bf16 autocast).

- ours: ``FeatureExtractionModule`` in the Lightning Trainer (validation every epoch, as a user
  runs it). "cold" starts from an empty cache directory, so computing the train/val features is
  inside the timed fit; "warm" runs the same fit again and reads the cache.
- seeds' loop: plain PyTorch; every epoch pushes every image through the frozen backbone (eval
  mode, ``no_grad``) and then steps the head, then validates (recomputing the validation
  features), as seed 003's ``train_long`` does and as ours does (``--seeds-no-val``: the loop
  without validation, a lower bar for the speed-up). One run of max(E) epochs, the clock
  paused while the test accuracy is taken after each E in the list (no scheduler, so a run stopped
  at E is the same run). The "train-mode" variant is the seeds' real bug: ``model.train()`` on
  the frozen backbone, so BatchNorm running statistics drift toward the digits.

Timings cover training only (fit / the epoch loop), not building the backbone, the in-memory
digits (``dm.setup`` runs before the clock for both) or the test pass.

    python benchmarks/feature_extraction.py            # E = 1, 5, 10, 30
    python benchmarks/feature_extraction.py --quick    # E = 1, 2 at 32 px: smoke test
"""

from __future__ import annotations

import argparse
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
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader

from tl_lightning.backbones import build_backbone
from tl_lightning.data import DigitsDataModule
from tl_lightning.modules import FeatureExtractionModule

BACKBONE, BATCH, LR = "efficientnet_lite0", 64, 1e-3
SIZE = 64  # image side; --size overrides (--quick uses 32)
DROP_LAST = False  # --seeds-drop-last: same number of steps per epoch as ours
SEEDS_VALIDATE = True  # --seeds-no-val: the seeds' loop skips the per-epoch validation
SEED = 0  # --seed: head init and shuffling, same for both
PRECISION = "32-true"  # --precision: the same for both loops


def datamodule() -> DigitsDataModule:
    return DigitsDataModule(backbone=BACKBONE, image_size=SIZE, batch_size=BATCH, num_workers=0)


def run_ours(epochs: int, cache_dir: str) -> tuple[float, float]:
    """Seconds for ``trainer.fit`` and the test accuracy of the fitted head."""
    seed_everything(SEED, verbose=False)
    dm = datamodule()
    dm.setup("fit")  # building the in-memory digits is outside the clock, as for the seeds' loop
    model = FeatureExtractionModule(
        num_classes=10, backbone=BACKBONE, cache_dir=cache_dir, channels_last=True
    )
    trainer = Trainer(max_epochs=epochs, precision=PRECISION, **bare_trainer_kwargs())
    with timer() as t:
        trainer.fit(model, datamodule=dm)
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    return t["s"], float(acc)


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, loader: DataLoader) -> float:
    was = backbone.training
    backbone.eval()
    correct = total = 0
    for x, y in loader:
        with forward_context(PRECISION):  # head included, as in Lightning's bf16-mixed forward
            pred = head(backbone(x.contiguous(memory_format=torch.channels_last))).argmax(1)
        correct += int((pred == y).sum())
        total += len(y)
    backbone.train(was)
    return correct / total


def run_seeds(checkpoints: list[int], backbone_mode: str) -> dict[int, tuple[float, float]]:
    """The seeds' loop; ``{E: (seconds of training up to E, test accuracy at E)}``."""
    seed_everything(SEED, verbose=False)
    dm = datamodule()
    dm.setup("fit")
    backbone = build_backbone(BACKBONE).to(memory_format=torch.channels_last)
    for p in backbone.parameters():
        p.requires_grad = False
    head = nn.Linear(backbone.feature_dim, 10)
    optimizer = torch.optim.AdamW(head.parameters(), lr=LR)
    # the library's train loader drops the last partial batch; the seeds' loop keeps it
    train = DataLoader(dm.train_set, batch_size=BATCH, shuffle=True, drop_last=DROP_LAST)
    test = DataLoader(dm.test_set, batch_size=BATCH)
    val = DataLoader(dm.val_set, batch_size=BATCH)
    results, elapsed = {}, 0.0
    for epoch in range(1, max(checkpoints) + 1):
        start = time.perf_counter()
        backbone.train(backbone_mode == "train")  # the seeds call model.train() here
        head.train()
        for x, y in train:
            with forward_context(PRECISION):  # the head too, as in Lightning's bf16-mixed forward
                with torch.no_grad():
                    feats = backbone(x.contiguous(memory_format=torch.channels_last))
                logits = head(feats)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if SEEDS_VALIDATE:
            accuracy(backbone, head, val)  # the seeds print it; the clock includes it
        elapsed += time.perf_counter() - start
        if epoch in checkpoints:
            results[epoch] = (elapsed, accuracy(backbone, head, test))
            print(f"  seeds ({backbone_mode} mode) epoch {epoch}: {results[epoch]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="E = 1, 2 at 32 px (smoke test)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 5, 10, 30])
    parser.add_argument("--bug-epochs", type=int, default=10, help="length of the train-mode run")
    parser.add_argument("--size", type=int, default=64, help="image side in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument(
        "--seeds-drop-last",
        action="store_true",
        help="the seeds' loop drops the last partial batch, as the library's loader does",
    )
    parser.add_argument(
        "--seeds-no-val",
        action="store_true",
        help="the seeds' loop skips its per-epoch validation (ours still validates)",
    )
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    global SIZE, DROP_LAST, SEED, SEEDS_VALIDATE, PRECISION
    SEED = args.seed
    PRECISION = args.precision
    SIZE = 32 if args.quick else args.size
    DROP_LAST = args.seeds_drop_last
    SEEDS_VALIDATE = not args.seeds_no_val
    epochs = [1, 2] if args.quick else sorted(args.epochs)
    bug_epochs = 1 if args.quick else args.bug_epochs
    quiet_lightning()
    print_header("Feature extraction: cached linear probe vs the seeds' loop")
    print(
        f"digits at {SIZE} px, {BACKBONE}, batch {BATCH}, AdamW lr {LR}, {PRECISION} + channels_last, "
        f"seed {SEED}, seeds' loop drop_last={DROP_LAST} (ours: True), "
        f"seeds' loop validates each epoch: {SEEDS_VALIDATE} (ours: yes)\n"
    )

    seeds = run_seeds(epochs, "eval")
    rows = []
    for e in epochs:
        with tempfile.TemporaryDirectory() as cache:
            cold_s, cold_acc = run_ours(e, cache)
            warm_s, warm_acc = run_ours(e, cache)
        seeds_s, seeds_acc = seeds[e]
        print(
            f"  ours E={e}: cold {cold_s:.2f} s, warm {warm_s:.2f} s, acc {cold_acc:.4f}",
            flush=True,
        )
        rows.append(
            [
                e,
                fmt(cold_s),
                fmt(warm_s),
                fmt(seeds_s),
                f"{seeds_s / cold_s:.1f}x",
                f"{seeds_s / warm_s:.1f}x",
                fmt(100 * cold_acc, 1),
                fmt(100 * warm_acc, 1),
                fmt(100 * seeds_acc, 1),
                f"{100 * (cold_acc - seeds_acc):+.1f}",
            ]
        )
    print_table(
        [
            "epochs",
            "ours cold cache (s)",
            "ours warm cache (s)",
            "seeds' loop (s)",
            "speed-up cold",
            "speed-up warm",
            "test acc ours cold (%)",
            "test acc ours warm (%)",
            "test acc seeds (%)",
            "acc diff (points)",
        ],
        rows,
    )

    bug_checkpoints = [e for e in epochs if e <= bug_epochs] or [bug_epochs]
    bug = run_seeds(bug_checkpoints, "train")
    rows = [
        [
            e,
            fmt(100 * seeds[e][1], 1) if e in seeds else "-",
            fmt(100 * bug[e][1], 1),
            fmt(bug[e][0]),
        ]
        for e in bug_checkpoints
    ]
    print("Seeds' bug: `model.train()` on the frozen backbone (BN running stats move):\n")
    print_table(
        [
            "epochs",
            "seeds eval-mode test acc (%)",
            "seeds train-mode test acc (%)",
            "train-mode (s)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
