"""Gradual unfreezing side by side: ours vs Lightning BackboneFinetuning vs finetuning-scheduler vs fastai.

Same protocol for all: scikit-learn digits at 64 px, stratified 60/20/20 split, offline
ImageNet EfficientNet-Lite0, 2 frozen epochs (head only) then 4 with the whole network, Adam at
1e-3 on the head (0.1x on the backbone once it unfreezes), batch 64, fp32 + channels_last. Each
method runs in its own process, one after the other, on the same number of threads. With several
``--seeds`` (the split seed and the training seed are both the seed) the order of the methods
rotates per seed (seed k starts at row k * rows / seeds), so the varying load of other processes
on a shared machine falls on every method alike; the tables give each seed and the mean.

    python benchmarks/unfreezing.py                       # all methods, seed 0
    python benchmarks/unfreezing.py --seeds 0 1 2         # three seeds, rotated order
    python benchmarks/unfreezing.py --fastai-site DIR --fts-site DIR2   # peers pip-installed --target
    python benchmarks/unfreezing.py --ours '{}' '{"bn": "stats", "frozen_head": "probe"}'   # one row each

fastai and finetuning-scheduler are imported from ``--fastai-site`` / ``--fts-site`` (or the
environment); a method that fails to import is reported as failed.

Ours trains its frozen epochs on cached features where that is exact (``cache_frozen``, default;
``bn: eval``, or ``bn: stats`` after one BatchNorm-statistics pass). Each run starts from an empty
feature cache (a fresh ``TL_LIGHTNING_CACHE``), so computing the cache is inside its clock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FROZEN, UNFROZEN, LR, BACKBONE_RATIO = 2, 4, 1e-3, 0.1
OURS_KWARGS: dict = {}  # --ours '{"bn": "train"}': extra GradualUnfreezing arguments
METHODS = ["ours", "lightning", "fts", "fastai", "feature_extraction"]
LABELS = {
    "ours": "tl-lightning GradualUnfreezing",
    "lightning": "Lightning BackboneFinetuning",
    "fts": "finetuning-scheduler",
    "fastai": "fastai fine_tune",
    "feature_extraction": "reference: FeatureExtractionModule (truly frozen)",
}


SEED = 0  # the child's seed: split and training


def datamodule():
    from tl_lightning.data.digits import DigitsDataModule

    dm = DigitsDataModule(backbone="efficientnet_lite0", image_size=64, batch_size=64, seed=SEED)
    dm.setup("fit")
    return dm


class EpochTimer:
    """Wall time of each epoch (training + validation), as a Lightning callback."""

    def __new__(cls):
        from lightning.pytorch import Callback

        class _Timer(Callback):
            def __init__(self):
                self.starts: list[float] = []
                self.end = 0.0

            def on_train_epoch_start(self, trainer, pl_module):
                self.starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                self.end = time.perf_counter()

            def durations(self) -> list[float]:
                marks = [*self.starts, self.end]
                return [b - a for a, b in zip(marks, marks[1:], strict=False)]

        return _Timer()


def run_lightning(method: str) -> dict:
    import functools

    import torch
    from lightning.pytorch import Trainer, seed_everything

    from tl_lightning.modules.base import ClassifierModule

    seed_everything(SEED, workers=True)
    dm = datamodule()
    adam = functools.partial(torch.optim.Adam, lr=LR)
    common = {
        "num_classes": 10,
        "backbone": "efficientnet_lite0",
        "optimizer": adam,
        "channels_last": True,
    }
    epochs = FROZEN + UNFROZEN
    if method == "ours":
        from tl_lightning.callbacks.unfreezing import GradualUnfreezing
        from tl_lightning.modules.finetune import FineTuneModule

        model = FineTuneModule(**common)
        kwargs = {"unfreeze_at_epoch": FROZEN, "lr_ratio": BACKBONE_RATIO, **OURS_KWARGS}
        callbacks = [GradualUnfreezing(**kwargs)]
    elif method == "lightning":
        from lightning.pytorch.callbacks import BackboneFinetuning

        model = ClassifierModule(**common)  # optimizer over requires_grad params, as its docs ask
        callbacks = [
            BackboneFinetuning(
                unfreeze_backbone_at_epoch=FROZEN, backbone_initial_ratio_lr=BACKBONE_RATIO
            )
        ]
    elif method == "fts":
        from finetuning_scheduler import FinetuningScheduler, FTSCheckpoint

        model = ClassifierModule(**common)
        names = [n for n, _ in model.named_parameters()]
        schedule = {
            0: {
                "params": [n for n in names if n.startswith("head.")],
                "max_transition_epoch": FROZEN,
            },
            1: {
                "params": [n for n in names if n.startswith("backbone.")],
                "lr": LR * BACKBONE_RATIO,
                "max_transition_epoch": FROZEN + UNFROZEN,
            },
        }
        callbacks = [
            FinetuningScheduler(ft_schedule=schedule, epoch_transitions_only=True, max_depth=1),
            FTSCheckpoint(monitor="val/loss", dirpath=tempfile.mkdtemp(), save_top_k=1),
        ]
    else:  # feature_extraction: the cost of a truly frozen epoch
        from tl_lightning.modules.feature_extraction import FeatureExtractionModule

        model = FeatureExtractionModule(**common)
        callbacks, epochs = [], FROZEN
    timer = EpochTimer()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision="32-true",
        logger=False,
        enable_checkpointing=method == "fts",  # finetuning-scheduler needs its FTSCheckpoint
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[*callbacks, timer],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    total = time.perf_counter() - start
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    return {"acc": acc, "epochs": timer.durations(), "total": total}


def run_fastai() -> dict:
    import torch
    from fastai.vision.all import Adam, DataLoaders, Learner, accuracy
    from lightning.pytorch import seed_everything

    from tl_lightning.modules.base import ClassifierModule

    seed_everything(SEED, workers=True)
    dm = datamodule()
    net = ClassifierModule(num_classes=10, backbone="efficientnet_lite0").to(
        memory_format=torch.channels_last
    )
    model = torch.nn.Sequential(net.backbone, net.head)
    groups = [g.params for g in net.backbone.layer_groups()] + [list(net.head.parameters())]
    dls = DataLoaders(dm.train_dataloader(), dm.val_dataloader(), device=torch.device("cpu"))
    learn = Learner(
        dls,
        model,
        loss_func=torch.nn.CrossEntropyLoss(),
        opt_func=Adam,
        metrics=accuracy,
        splitter=lambda m: groups,
    )
    learn.remove_cb(learn.cbs.filter(lambda cb: type(cb).__name__ == "ProgressCallback")[0])
    marks = []
    from fastai.callback.core import Callback

    class Timer(Callback):
        order = 100

        def before_epoch(self):
            marks.append(time.perf_counter())

    learn.add_cb(Timer())
    start = time.perf_counter()
    learn.fine_tune(UNFROZEN, base_lr=LR, freeze_epochs=FROZEN)
    total = time.perf_counter() - start
    marks.append(start + total)
    model.eval()
    correct = n = 0
    dm.setup("test")
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (
                (model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
            )
            n += len(y)
    return {
        "acc": correct / n,
        "epochs": [b - a for a, b in zip(marks, marks[1:], strict=False)],
        "total": total,
    }


def child(method: str, threads: int, ours: str, seed: int) -> None:
    import torch

    global SEED
    SEED = seed
    OURS_KWARGS.update(json.loads(ours))

    torch.set_num_threads(threads)
    result = run_fastai() if method == "fastai" else run_lightning(method)
    print("RESULT " + json.dumps(result))


def _label(method: str, ours: str) -> str:
    return LABELS[method] + (f" {ours}" if method == "ours" and ours != "{}" else "")


def _run_one(method: str, ours: str, seed: int, args) -> dict:
    env = dict(os.environ)
    env["TL_LIGHTNING_CACHE"] = tempfile.mkdtemp(prefix="tl_unfreezing_cache_")  # cold cache
    site = {"fastai": args.fastai_site, "fts": args.fts_site}.get(method)
    if site:  # the peer's packages for its own process only
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        method,
        "--threads",
        str(args.threads),
        "--ours",
        ours,
        "--seeds",
        str(seed),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "error": tail[0][:120]}
    return {"method": method, **json.loads(line[len("RESULT ") :])}


def _fastest_peer(rows: dict) -> float | None:
    peers = [
        r["total"]
        for r in rows.values()
        if r["method"] not in ("ours", "feature_extraction") and "total" in r
    ]
    return min(peers) if peers else None


def _seed_table(seed: int, rows: dict) -> None:
    fastest = _fastest_peer(rows)
    print(f"\nSeed {seed}\n")
    print(
        "| method | test acc | s/epoch frozen | s/epoch unfrozen | total s | total / fastest peer |"
    )
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        if "error" in r:
            print(f"| {label} | failed: {r['error']} | | | | |")
            continue
        ep = r["epochs"]
        frozen = sum(ep[:FROZEN]) / len(ep[:FROZEN])
        unfrozen = f"{sum(ep[FROZEN:]) / len(ep[FROZEN:]):.2f}" if ep[FROZEN:] else "-"
        ratio = (
            f"{r['total'] / fastest:.2f}"
            if fastest and r["method"] != "feature_extraction"
            else "-"
        )
        print(
            f"| {label} | {r['acc']:.3f} | {frozen:.2f} | {unfrozen} | {r['total']:.1f} | {ratio} |"
        )


def _mean_table(seeds: list[int], by_seed: dict[int, dict]) -> None:
    """Per row: test acc and total s of each seed and their mean; ratios to each seed's fastest peer."""
    labels = list(next(iter(by_seed.values())))
    fastest = {s: _fastest_peer(by_seed[s]) for s in seeds}
    means = {}
    for label in labels:
        runs = [by_seed[s].get(label, {}) for s in seeds]
        if all("total" in r for r in runs):
            means[label] = (
                sum(r["acc"] for r in runs) / len(runs),
                sum(r["total"] for r in runs) / len(runs),
            )
    peer_means = [
        t for label, (_, t) in means.items() if by_seed[seeds[0]][label]["method"] != "ours"
    ]
    fastest_mean = min(peer_means) if peer_means else None
    names = " / ".join(str(s) for s in seeds)
    print(f"\nAll seeds ({names}; methods in rotated order)\n")
    print(
        f"| method | test acc ({names}) | mean acc | total s ({names}) | mean total s "
        "| total / fastest peer per seed | mean total / fastest peer's mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for label in labels:
        runs = [by_seed[s].get(label, {}) for s in seeds]
        if label not in means:
            print(f"| {label} | failed in some seed | | | | | |")
            continue
        acc, total = means[label]
        per_ratio = " / ".join(
            f"{r['total'] / fastest[s]:.2f}" if fastest[s] else "-"
            for s, r in zip(seeds, runs, strict=True)
        )
        accs = " / ".join(f"{r['acc']:.3f}" for r in runs)
        totals = " / ".join(f"{r['total']:.1f}" for r in runs)
        mean_ratio = f"{total / fastest_mean:.2f}" if fastest_mean else "-"
        print(
            f"| {label} | {accs} | {acc:.3f} | {totals} | {total:.1f} | {per_ratio} | {mean_ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per run (the CPU is shared)"
    )
    parser.add_argument("--fastai-site", default=None, help="extra sys.path entry holding fastai")
    parser.add_argument(
        "--fts-site", default=None, help="extra sys.path entry holding finetuning-scheduler"
    )
    parser.add_argument(
        "--ours",
        nargs="+",
        default=["{}"],
        help="JSON of extra GradualUnfreezing arguments; several give one row each",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="split and training seeds, one pass each"
    )
    parser.add_argument("--json", default=None, help="also write every run's result to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.ours[0], args.seeds[0])
        return
    runs = [
        (method, ours)
        for method in args.methods
        for ours in (args.ours if method == "ours" else ["{}"])
    ]
    by_seed: dict[int, dict] = {}
    for k, seed in enumerate(args.seeds):
        # rotated, the starts spread over the list: each row runs early, midway and late
        shift = k * len(runs) // len(args.seeds)
        results = {}
        for method, ours in runs[shift:] + runs[:shift]:
            label = _label(method, ours)
            results[label] = _run_one(method, ours, seed, args)
            print(f"seed {seed} {label}: {results[label]}", file=sys.stderr, flush=True)
        by_seed[seed] = {_label(m, o): results[_label(m, o)] for m, o in runs}  # table order
        if args.json:
            Path(args.json).write_text(json.dumps(by_seed, indent=1))
    print(
        f"\nDigits 64 px, EfficientNet-Lite0 (ImageNet), {FROZEN} frozen + {UNFROZEN} unfrozen epochs, "
        f"Adam {LR:g}, fp32 + channels_last, {args.threads} thread(s)"
    )
    for seed in args.seeds:
        _seed_table(seed, by_seed[seed])
    if len(args.seeds) > 1:
        _mean_table(args.seeds, by_seed)


if __name__ == "__main__":
    main()
