"""Fine-tuning that knows what it forgets: plain FT, LP, LP-FT, L2-SP, LwF and WiSE-FT side by side.

EfficientNet-Lite0 (ImageNet weights, offline) fine-tuned on the scikit-learn digits (ID). Each
model is evaluated on the digits test split (ID) and on the *same* test digits blended onto photo
patches (digits-M, OOD: same classes and handwriting, another appearance; its labels are used
only here, to evaluate). Source agreement and CKA drift are measured on the default reference set
(seeded crops of the photos scikit-image/scikit-learn ship) at the backbone's 224 px.

Every row uses the same optimiser, schedule and epochs; nothing is tuned, least of all on OOD
labels. WiSE-FT interpolates LP-FT's run (start = pretrained backbone + probe head) and picks
``a`` on the ID val split.

    python benchmarks/robust_finetune.py --seeds 0 1 2 --epochs 3 --image-size 32 --plot docs/robust_finetune.png
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch
from _common import (
    add_threads_arg,
    apply_threads,
    mean_std,
    print_header,
    print_table,
    quiet_lightning,
)
from lightning.pytorch import Callback, Trainer, seed_everything

from tl_lightning.data import DigitsDataModule, DigitsMDataModule
from tl_lightning.forgetting import ReferenceSet
from tl_lightning.modules import FineTuneModule
from tl_lightning.optim import OneCycleLR
from tl_lightning.wise_ft import accuracy, wise_ft

METHODS = {  # paper defaults (see tl_lightning/regularizers.py); track_forgetting keeps the start
    "plain FT": {"track_forgetting": True},
    "LP-FT": {"init_head": "probe"},
    "L2-SP": {"l2sp_alpha": 0.1, "l2sp_beta": 0.01},
    "LwF": {"lwf_alpha": 1.0, "lwf_temperature": 2.0},
    # the same with the pretrained BatchNorm statistics kept (see README: what the regularisers miss)
    "plain FT, BN kept": {"track_forgetting": True, "keep_bn_statistics": True},
    "L2-SP, BN kept": {"l2sp_alpha": 0.1, "l2sp_beta": 0.01, "keep_bn_statistics": True},
    "LwF, BN kept": {"lwf_alpha": 1.0, "lwf_temperature": 2.0, "keep_bn_statistics": True},
    "LP-FT, BN kept": {"init_head": "probe", "keep_bn_statistics": True},
}
DEFAULT_METHODS = ["plain FT", "LP-FT", "L2-SP", "LwF"]
ORDER = ("plain FT", "LP", "LP-FT", "L2-SP", "LwF", "WiSE-FT", "plain FT, BN kept", "LP-FT, BN kept", "L2-SP, BN kept", "LwF, BN kept", "WiSE-FT, BN kept")


class ProbeTime(Callback):
    """Seconds of LP-FT's first stage: from fit start to the first training batch."""

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.s = time.perf_counter() - self.t0


def evaluate(backbone, head, id_loader, ood_loader, reference, start) -> dict:
    out = {"id": accuracy(backbone, head, id_loader), "ood": accuracy(backbone, head, ood_loader)}
    out.update(reference.measure(backbone, start))
    return out


def run_seed(seed: int, args, reference: ReferenceSet) -> dict[str, dict]:
    data = dict(backbone="efficientnet_lite0", image_size=args.image_size, batch_size=64, augment="none", seed=0)
    dm = DigitsDataModule(**data)
    # the same test digits (same split seed and fractions), blended onto photo patches
    ood = DigitsMDataModule(**data, part="all", blend=True)
    dm.setup("fit")
    ood.setup("test")
    id_loader, ood_loader = dm.test_dataloader(), ood.test_dataloader()
    assert torch.equal(torch.as_tensor(dm.test_set.labels), torch.as_tensor(ood.test_set.labels))
    rows: dict[str, dict] = {}
    printed: set[str] = set()
    for name in args.methods:
        extra = METHODS[name]
        seed_everything(seed, workers=True)
        model = FineTuneModule(
            num_classes=10,
            head_dropout=0.2,
            label_smoothing=0.1,
            optimizer=functools.partial(torch.optim.AdamW, lr=args.lr, weight_decay=0.01),
            lr_scheduler=OneCycleLR,
            **extra,
        )
        probe_time = ProbeTime()
        trainer = Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            precision="32-true",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,  # no model selection on anything: every row trains the same epochs
            callbacks=[probe_time],
        )
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        seconds = time.perf_counter() - t0
        model.eval()
        suffix = name.removeprefix("LP-FT")  # LP-FT rows: "" or ", BN kept"
        if name.startswith("LP-FT"):  # the probe alone (LP): the starting backbone with the probe's head
            rows["LP" + suffix] = evaluate(model.start.backbone, model.start.head, id_loader, ood_loader, reference, model.start)
            rows["LP" + suffix]["seconds"] = probe_time.s
        rows[name] = evaluate(model.backbone, model.head, id_loader, ood_loader, reference, model.start)
        rows[name]["seconds"] = seconds
        if name.startswith("LP-FT"):
            t1 = time.perf_counter()
            result = wise_ft(model, dm.val_dataloader(), reference=reference)  # a chosen on ID val only
            rows["WiSE-FT" + suffix] = evaluate(model.backbone, model.head, id_loader, ood_loader, reference, model.start)
            rows["WiSE-FT" + suffix].update(seconds=seconds + time.perf_counter() - t1, a=result.a, curve=result.curve)
        for key in [k for k in rows if k not in printed]:
            printed.add(key)
            print(f"seed {seed} {key}: " + json.dumps({k: v for k, v in rows[key].items() if k != "curve"}), flush=True)
    # for the README: OOD accuracy along WiSE-FT's path (evaluation only, a is not chosen with it)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--reference-images", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--plot", default=None, help="write accuracy-vs-source-agreement plot (PNG) here")
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    quiet_lightning()
    print_header("Robust fine-tuning: EfficientNet-Lite0, digits (ID) -> digits-M (OOD)")
    lite0 = FineTuneModule(num_classes=10).backbone.data_config
    reference = ReferenceSet.default(lite0, args.reference_images)
    results = {seed: run_seed(seed, args, reference) for seed in args.seeds}
    rows = [r for r in ORDER if r in results[args.seeds[0]]]

    def col(row, key):
        return [results[s][row][key] for s in args.seeds]

    table = []
    for row in rows:
        table.append(
            [
                row,
                mean_std(col(row, "id")),
                mean_std(col(row, "ood")),
                mean_std(col(row, "source_agreement")),
                mean_std(col(row, "cka_drift")),
                f"{statistics.mean(col(row, 'seconds')):.0f}",
            ]
        )
    print(f"mean +- std over seeds {args.seeds}; {args.epochs} epochs at {args.image_size} px\n")
    print_table(["method", "ID test acc", "OOD (digits-M) acc", "source agreement", "CKA drift", "seconds"], table)
    per_seed = [
        [s, *(f"{results[s][r]['id']:.3f} / {results[s][r]['ood']:.3f} / {results[s][r]['source_agreement']:.2f}" for r in rows)]
        for s in args.seeds
    ]
    print("per seed: ID / OOD / source agreement\n")
    print_table(["seed", *rows], per_seed)
    if "WiSE-FT" in rows:
        wise_path(results, args.seeds)
    if all(r in rows for r in ("plain FT", "LP-FT", "L2-SP", "LwF", "WiSE-FT")):
        targets(results, args.seeds)
    agree = [results[s][r]["source_agreement"] for s in args.seeds for r in rows]
    ood = [results[s][r]["ood"] for s in args.seeds for r in rows]
    print(f"correlation over all rows and seeds, source agreement vs OOD accuracy: {_pearson(agree, ood):+.2f}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(s): r for s, r in results.items()}, f, indent=1)
    if args.plot:
        plot(results, args.seeds, rows, args.plot)


def wise_path(results, seeds) -> None:
    print("WiSE-FT a chosen on ID val per seed: " + ", ".join(f"{results[s]['WiSE-FT']['a']:g}" for s in seeds) + "\n")
    print("WiSE-FT path (seed mean; a chosen on ID val, OOD shown for the analysis only)\n")
    grid = [r["a"] for r in results[seeds[0]]["WiSE-FT"]["curve"]]
    path = []
    for i, a in enumerate(grid):
        curves = [results[s]["WiSE-FT"]["curve"][i] for s in seeds]
        path.append([f"{a:g}", *(f"{statistics.mean(c[k] for c in curves):.3f}" for k in ("val_acc", "source_agreement", "cka_drift"))])
    print_table(["a", "ID val acc", "source agreement", "CKA drift"], path)


def targets(results, seeds) -> None:
    def mean(row, key):
        return statistics.mean(results[s][row][key] for s in seeds)

    lines = [
        ("LP-FT OOD > plain FT OOD on every seed", all(results[s]["LP-FT"]["ood"] > results[s]["plain FT"]["ood"] for s in seeds)),
        ("LP-FT ID within 0.5 points of plain FT", abs(mean("LP-FT", "id") - mean("plain FT", "id")) <= 0.005),
        ("L2-SP source agreement >= 2x plain FT", _at_least_twice(mean("L2-SP", "source_agreement"), mean("plain FT", "source_agreement"))),
        ("L2-SP ID within 1 point of plain FT", abs(mean("L2-SP", "id") - mean("plain FT", "id")) <= 0.01),
        ("LwF source agreement >= 2x plain FT", _at_least_twice(mean("LwF", "source_agreement"), mean("plain FT", "source_agreement"))),
        ("LwF ID within 1 point of plain FT", abs(mean("LwF", "id") - mean("plain FT", "id")) <= 0.01),
        ("WiSE-FT OOD > plain FT OOD", mean("WiSE-FT", "ood") > mean("plain FT", "ood")),
    ]
    print_table(["target", "met"], [[t, "yes" if ok else "**no**"] for t, ok in lines])


def _at_least_twice(x: float, base: float) -> bool:
    return x >= 2 * base and x > base  # 0 >= 2 * 0 is no improvement

def _pearson(x, y) -> float:
    mx, my = statistics.mean(x), statistics.mean(y)
    sx = sum((a - mx) ** 2 for a in x) ** 0.5
    sy = sum((b - my) ** 2 for b in y) ** 0.5
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / max(sx * sy, 1e-12)


def plot(results, seeds, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        for ax, key in zip(axes, ("id", "ood")):
            xs = [results[s][row]["source_agreement"] for s in seeds]
            ys = [results[s][row][key] for s in seeds]
            ax.scatter(xs, ys, label=row)
    for ax, title in zip(axes, ("ID (digits test) accuracy", "OOD (digits-M) accuracy")):
        ax.set_xlabel("source (ImageNet) agreement with the start")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("EfficientNet-Lite0, digits -> digits-M, one point per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
