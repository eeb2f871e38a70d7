"""Does ``tl-lightning advise`` pick the strategy that wins? Every strategy run for real, side by side.

Six settings: scikit-learn digits and digits-M (photo-blended, far from ImageNet; ``part: all`` so
both have 1,078 training images), training split at 10 %, 30 % and 100 % (stratified, seeded;
validation and test splits untouched), offline ImageNet EfficientNet-Lite0. Per setting:

1. ``advise()`` with a cold feature cache (its wall time is the advice time);
2. every strategy (feature extraction, last groups, full fine-tune, gradual unfreezing) trained
   with the settings ``advise`` gives that strategy for the same time budget (epochs fitted to
   the budget on the measured epoch times; the config it would write, built by the same code);
3. test accuracy of each, the advised pick, and the seeds' size rule's pick.

The rule never sees test labels: they are read only in step 3, after the advice is fixed.

    python benchmarks/advise.py                              # 60 s budget, 32 px
    python benchmarks/advise.py --budget 120 --image-size 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    apply_threads,
    bare_trainer_kwargs,
    print_header,
    print_table,
    quiet_lightning,
)

SHORT = {
    "feature_extraction": "FE",
    "last_groups": "last",
    "full_finetune": "full",
    "gradual_unfreezing": "gradual",
}


def subset_datamodule(dataset: str, fraction: float, image_size: int, batch_size: int = 64):
    """The digits / digits-M datamodule whose training split keeps ``fraction`` of its images."""
    import numpy as np

    from tl_lightning.data import DigitsDataModule, DigitsMDataModule
    from tl_lightning.data.split import stratified_split

    base = DigitsMDataModule if dataset == "digits_m" else DigitsDataModule

    class Subset(base):
        def split_indices(self, split: str) -> np.ndarray:
            indices = super().split_indices(split)
            if split != "train" or fraction >= 1:
                return indices
            labels = self.load_images().labels[indices]
            keep, _ = stratified_split(labels, (fraction, 1 - fraction), seed=0)
            return np.sort(indices[keep])

    kwargs = {"part": "all"} if dataset == "digits_m" else {}
    return Subset(image_size=image_size, batch_size=batch_size, seed=0, **kwargs)


def run_strategy(
    strategy, evidence, dataset, fraction, image_size, cache_dir
) -> tuple[float, float, int]:
    """Train ``strategy`` as advise would configure it; returns (test acc, seconds, epochs)."""
    from lightning.pytorch import Callback, LightningModule, seed_everything

    from tl_lightning.advisor.advise import data_section
    from tl_lightning.advisor.command import instantiate_section as instantiate
    from tl_lightning.advisor.config import advised_config
    from tl_lightning.advisor.rule import settings_for
    from tl_lightning.precision import TLTrainer

    rec = settings_for(strategy, evidence)
    dm = subset_datamodule(dataset, fraction, image_size, rec.batch_size)
    cfg = advised_config(rec, data_section(dm), "efficientnet_lite0", "DEFAULT")
    model_cfg = copy.deepcopy(cfg["model"])
    model_cfg["init_args"]["num_classes"] = 10
    if strategy == "feature_extraction":  # a cold cache of its own: caching counts in its time
        model_cfg["init_args"]["cache_dir"] = str(cache_dir)
    seed_everything(0, workers=True)
    start = time.perf_counter()
    model = instantiate(LightningModule, model_cfg)
    callbacks = [instantiate(Callback, c) for c in cfg["trainer"].get("callbacks", [])]
    trainer = TLTrainer(
        max_epochs=rec.epochs, precision=rec.precision, callbacks=callbacks, **bare_trainer_kwargs()
    )
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    return float(acc), seconds, rec.epochs


def advice_breakdown(args) -> None:
    """Seconds of each part of the advice (cold feature cache), per setting, and what the previous
    probe (L-BFGS logistic, benchmarks/advise_probe.py) takes on the same features in the same run."""
    import torch
    from advise_probe import logistic_kfold

    from tl_lightning.advisor import advise
    from tl_lightning.advisor.advise import embed_train_split
    from tl_lightning.backbones import build_backbone
    from tl_lightning.precision import mixed_precision_for

    g = torch.Generator().manual_seed(0)
    logistic_kfold(torch.randn(30, 8, generator=g), torch.arange(3).repeat(10), 3, 3)  # start-up
    rows = []
    for dataset in args.datasets:
        for fraction in args.fractions:
            with tempfile.TemporaryDirectory() as tmp:
                dm = subset_datamodule(dataset, fraction, args.image_size)
                a = advise(dm, budget_minutes=args.budget / 60, out=None, cache_dir=tmp)
                bb = build_backbone(dm.hparams.backbone, weights=dm.hparams.weights)
                emb = embed_train_split(
                    bb, dm, mixed_precision_for("cpu"), torch.device("cpu"), tmp
                )
                x, y = emb.features, emb.labels
            start = time.perf_counter()
            logistic_kfold(x, y, dm.num_classes, a.distance.folds)
            old_probe = time.perf_counter() - start
            before = a.seconds - a.phases["probe"] + old_probe
            rows.append(
                [
                    f"{dataset} {fraction:.0%} (n={a.description.num_train})",
                    a.recommendation.strategy,
                    f"{a.distance.probe_acc:.3f}",
                    f"{a.distance.bn_shift:.4f}",
                    f"{a.seconds:.1f}",
                ]
                + [f"{s:.1f}" for s in a.phases.values()]
                + [f"{old_probe:.1f}", f"{before:.1f}"]
            )
            names = list(a.phases)
            print(f"done: {rows[-1]}", flush=True)
    print("\nWhere the advice time goes (seconds, cold feature cache):\n")
    print_table(
        [
            "setting",
            "advised",
            "probe acc",
            "BN shift",
            "total s",
            *[f"{n} s" for n in names],
            "previous probe s (same features)",
            "total with the previous probe s",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds per strategy")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--datasets", nargs="+", default=["digits", "digits_m"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--advice-only", action="store_true", help="only where the advice time goes"
    )
    args = parser.parse_args()
    apply_threads(args.threads)
    quiet_lightning()
    from tl_lightning.advisor import advise, seeds_size_rule
    from tl_lightning.advisor.rule import STRATEGIES

    print_header(
        f"advise vs every strategy ({args.budget:.0f} s budget each, {args.image_size} px)"
    )
    if args.advice_only:
        return advice_breakdown(args)
    rows, measures = [], []
    hits = not_worse = fast = 0
    for dataset in args.datasets:
        for fraction in args.fractions:
            with tempfile.TemporaryDirectory() as tmp:
                dm = subset_datamodule(dataset, fraction, args.image_size)
                advice = advise(
                    dm,
                    budget_minutes=args.budget / 60,
                    out=None,
                    cache_dir=str(Path(tmp) / "advice"),
                )
                e = advice.evidence
                results = {
                    s: run_strategy(s, e, dataset, fraction, args.image_size, Path(tmp) / s)
                    for s in STRATEGIES
                }
            acc = {s: r[0] for s, r in results.items()}
            best = max(acc.values())
            advised = advice.recommendation.strategy
            seeds = seeds_size_rule(e.num_train)
            cheapest = min(r[1] for r in results.values())
            embed = advice.phases["embedding"]  # the pass a feature-extraction fit shares
            hit = acc[advised] >= best - 0.01
            hits += hit
            not_worse += acc[advised] >= acc[seeds]
            fast += advice.seconds < 0.1 * cheapest
            name = f"{dataset} {fraction:.0%} (n={e.num_train})"
            rows.append(
                [name]
                + [f"{acc[s]:.3f} ({results[s][2]} ep, {results[s][1]:.0f} s)" for s in STRATEGIES]
                + [
                    f"{SHORT[advised]} {acc[advised]:.3f}",
                    f"{SHORT[seeds]} {acc[seeds]:.3f}",
                    "yes" if hit else "no",
                    f"{advice.seconds:.1f} / {cheapest:.1f} = {advice.seconds / cheapest:.2f}",
                    f"{embed:.1f} / {cheapest:.1f} = {embed / cheapest:.2f}",
                ]
            )
            measures.append(
                [
                    name,
                    f"{e.probe_acc:.3f}",
                    f"{e.knn_acc:.3f}",
                    f"{e.bn_shift:.4f}",
                    e.per_class_min,
                ]
                + [f"{e.epoch_seconds[s]:.1f}" for s in STRATEGIES]
                + [" / ".join(f"{v:.1f}" for v in advice.phases.values())]
            )
            phase_names = " / ".join(advice.phases)
            print(f"done: {rows[-1]}", flush=True)
    print(
        "\nTest accuracy per strategy (epochs, training seconds), the advised and the seeds' pick:\n"
    )
    print_table(
        [
            "setting",
            *[SHORT[s] for s in STRATEGIES],
            "advised",
            "seeds' size rule",
            "advice within 1 pt of best",
            "advice s / cheapest strategy s",
            "advice's embedding s / cheapest s",
        ],
        rows,
    )
    print("What the advice measured (training split only; no test label):\n")
    print_table(
        [
            "setting",
            "probe (k-fold)",
            "k-NN",
            "BN shift",
            "min per class",
            *[f"{SHORT[s]} s/epoch" for s in STRATEGIES],
            f"advice s: {phase_names}",
        ],
        measures,
    )
    n = len(rows)
    print(
        f"advice within 1 point of the best: {hits}/{n} (target >= 5/6); "
        f"not worse than the seeds' rule: {not_worse}/{n} (target {n}/{n}); "
        f"advice under 10 % of the cheapest strategy's time: {fast}/{n}"
    )


if __name__ == "__main__":
    main()
