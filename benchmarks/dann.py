"""DANN vs source-only on the offline digits -> digits-M pair: target-test accuracy over seeds.

    python benchmarks/dann.py                 # default: 1500 steps x 3 seeds (~5 min on 2 idle cores)
    python benchmarks/dann.py --full          # the planning length: 3000 steps of 64 + 64
    python benchmarks/dann.py --efficientnet  # add fine-tuned EfficientNet-Lite0 rows (slow on CPU)
    python benchmarks/dann.py --pytorch-adapt-site DIR  # add pytorch-adapt's DANN as a peer row

Every run trains the same code (``DANNModule``) with ``source_only`` on or off, then reports the
target-test accuracy of the final weights (no target label is used for training or selection).
Prints a markdown table: mean +- std over seeds, side by side, and the DANN - source-only gain.
The peer row (``benchmarks/dann_pytorch_adapt.py``) trains pytorch-adapt's DANN on the same data,
networks and schedules; its gain is against our source-only runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import statistics
import time
import warnings

import torch
from _common import mean_std
from lightning.pytorch import Trainer, seed_everything

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
from tl_lightning.data.digits_m import DigitsMSource
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.modules.dann import DANNModule

PAPER = "MNIST -> MNIST-M (Ganin et al. 2016): source-only 0.5225, DANN 0.7666"
PEER = "pytorch-adapt"  # the peer runs' label in the jobs and the per-run lines


def digits_pair(
    backbone: str, weights: str | None, image_size: int, batch_size: int, augment: str
) -> DomainAdaptationDataModule:
    return DomainAdaptationDataModule(
        source=DigitsMSource(part="source", blend=False),
        target=DigitsMSource(part="target"),
        augment=augment,
        backbone=backbone,
        weights=weights,
        image_size=image_size,
        batch_size=batch_size,
    )


def model_args(backbone: str) -> dict:
    if backbone == "dann_cnn":  # the paper's digits recipe: from scratch, all layers at lr0
        return dict(
            weights=None,
            head_hidden_dims=[100, 100],
            domain_hidden_dims=[100],
            domain_dropout=0.0,
            backbone_lr_scale=1.0,
            channels_last=False,
        )
    # fine-tuned pretrained backbone: paper's deep recipe (bottleneck 256, 1024-1024 domain head, 0.1x backbone)
    return dict(
        weights="DEFAULT",
        bottleneck_dim=256,
        domain_hidden_dims=[1024, 1024],
        domain_dropout=0.5,
        backbone_lr_scale=0.1,
        channels_last=True,
    )


def seeded_start(
    backbone: str,
    seed: int,
    image_size: int,
    batch_size: int,
    threads: int,
    augment: str,
    source_only: bool = False,
) -> tuple[DomainAdaptationDataModule, DANNModule]:
    """The data and the seeded initial model every run of this benchmark (and the peer) starts from."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)  # one thread per run: runs go in parallel, no oversubscription
    seed_everything(seed, workers=True, verbose=False)
    args = model_args(backbone)
    dm = digits_pair(backbone, args["weights"], image_size, batch_size, augment)
    model = DANNModule(num_classes=10, backbone=backbone, source_only=source_only, **args)
    return dm, model


def run(
    backbone: str,
    source_only: bool,
    seed: int,
    steps: int,
    image_size: int,
    batch_size: int,
    threads: int,
    augment: str,
    precision: str = "32-true",
) -> tuple[float, float, float]:
    """Train one model; returns (target-test acc, final train/domain_acc, seconds)."""
    dm, model = seeded_start(backbone, seed, image_size, batch_size, threads, augment, source_only)
    trainer = Trainer(
        max_steps=steps,
        max_epochs=-1,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # no selection: the final weights are reported
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    domain_acc = float(trainer.callback_metrics["train/domain_acc_epoch"])
    test = trainer.test(model, dm, verbose=False)[0]
    return test["test/acc"], domain_acc, seconds


def run_peer(
    seed: int, steps: int, image_size: int, batch_size: int, threads: int, augment: str
) -> tuple[float, None, float]:
    """pytorch-adapt's DANN on the dann_cnn setting; returns (target-test acc, None, seconds)."""
    from dann_pytorch_adapt import run_pytorch_adapt

    acc, seconds = run_pytorch_adapt(seed, steps, image_size, batch_size, threads, augment)
    return acc, None, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="3000 steps per run (the planning length)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per run (default 1500, --full 3000)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ..."
    )
    parser.add_argument("--no-cnn", action="store_true", help="only the EfficientNet-Lite0 rows")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="per domain: a batch is this many source + target",
    )
    parser.add_argument(
        "--efficientnet",
        action="store_true",
        help="also fine-tune efficientnet_lite0 (slow on CPU)",
    )
    parser.add_argument(
        "--augment",
        default="basic",
        help="train augmentation of both domains: basic (random crops, the default) or none",
    )
    parser.add_argument("--efficientnet-steps", type=int, default=200)
    parser.add_argument("--efficientnet-size", type=int, default=64)
    parser.add_argument(
        "--workers", type=int, default=2, help="runs trained in parallel (processes)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        default="32-true",
        help="of our runs (the pytorch-adapt peer always runs fp32)",
    )
    parser.add_argument(
        "--pytorch-adapt-site",
        metavar="DIR",
        help="add a pytorch-adapt DANN peer row (dann_cnn), importing pytorch_adapt from DIR",
    )
    args = parser.parse_args()
    steps = args.steps or (3000 if args.full else 1500)
    peer = args.pytorch_adapt_site is not None
    if peer and (args.no_cnn or args.precision != "32-true"):
        parser.error(
            "the pytorch-adapt peer row trains dann_cnn in fp32: drop --no-cnn/--precision"
        )
    if peer:
        from dann_pytorch_adapt import SITE_ENV, import_pytorch_adapt

        os.environ[SITE_ENV] = args.pytorch_adapt_site  # the spawned runs import it from there
        import_pytorch_adapt()  # a clear error now, not one per run

    configs = [] if args.no_cnn else [("dann_cnn", steps, args.image_size)]
    if args.efficientnet:
        configs.append(("efficientnet_lite0", args.efficientnet_steps, args.efficientnet_size))
    jobs = [
        (backbone, source_only, seed, n_steps, size, args.batch_size, args.threads, args.augment)
        + (args.precision,)
        for backbone, n_steps, size in configs
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for source_only in (True, False)
    ]
    if peer:
        jobs += [
            (PEER, False, seed, steps, args.image_size, args.batch_size, args.threads, args.augment)
            for seed in range(args.first_seed, args.first_seed + args.seeds)
        ]
    results: dict[tuple, tuple[float, float | None, float]] = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = {
            pool.submit(run_peer, *job[2:]) if job[0] == PEER else pool.submit(run, *job): job
            for job in jobs
        }
        for future in concurrent.futures.as_completed(futures):
            backbone, source_only, seed = futures[future][:3]
            acc, dacc, sec = results[futures[future]] = future.result()
            name = "source-only" if source_only else "DANN"
            domain = "" if dacc is None else f", domain_acc {dacc:.3f}"
            print(
                f"  {backbone} {name:11s} seed {seed}: target acc {acc:.3f}{domain}, {sec:.0f}s",
                flush=True,
            )
    rows = []
    for backbone, n_steps, size in configs:
        result = {
            so: [v for k, v in results.items() if k[0] == backbone and k[1] == so]
            for so in (True, False)
        }
        rows.append(
            (
                backbone,
                n_steps,
                size,
                [r[0] for r in result[True]],
                [r[0] for r in result[False]],
                result,
            )
        )

    print(
        f"\nDigits -> digits-M, target-test accuracy, {args.seeds} seeds, batches of {args.batch_size} + {args.batch_size}, "
        f"augment {args.augment}, precision {args.precision}\n"
    )
    print("| backbone | steps | px | source-only | DANN | gain | domain_acc (so / DANN) | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    for backbone, n_steps, size, so, da, result in rows:
        gain = statistics.mean(da) - statistics.mean(so)
        dso = statistics.mean(r[1] for r in result[True])
        dda = statistics.mean(r[1] for r in result[False])
        sec = statistics.mean(r[2] for rs in result.values() for r in rs)
        print(
            f"| {backbone} | {n_steps} | {size} | {mean_std(so)} | {mean_std(da)} | {gain:+.3f} | {dso:.2f} / {dda:.2f} | {sec:.0f} |"
        )
    if peer:
        pa = [v for k, v in results.items() if k[0] == PEER]
        gain = statistics.mean(r[0] for r in pa) - statistics.mean(rows[0][3])
        sec = statistics.mean(r[2] for r in pa)
        print(
            f"| pytorch-adapt DANN (peer), dann_cnn | {steps} | {args.image_size} | - | {mean_std([r[0] for r in pa])} | {gain:+.3f} | - | {sec:.0f} |"
        )
    print(f"\nReference: {PAPER}.")


if __name__ == "__main__":
    main()
