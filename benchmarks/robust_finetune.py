"""Fine-tuning that knows what it forgets: plain FT, LP, LP-FT, L2-SP, LwF and WiSE-FT side by side.

EfficientNet-Lite0 (ImageNet weights, offline) fine-tuned on the scikit-learn digits (ID). Each
model is evaluated on the digits test split (ID) and on the *same* test digits blended onto photo
patches (digits-M, OOD: same classes and handwriting, another appearance; its labels are used
only here, to evaluate). Source agreement and CKA drift are measured on the default reference set
(seeded crops of the photos scikit-image/scikit-learn ship) at the backbone's 224 px.

Every row uses the same optimiser, schedule and epochs. The forgetting-control methods keep the
pretrained BatchNorm statistics (as their configs ship); plain FT runs both ways. Two choices are
made by this script per seed on the ID **val** split, never on test or OOD labels: LP-FT's
fine-tuning LR (``--lpft-lrs``, the best val accuracy) and, when given a grid, LwF's alpha
(``--lwf-alphas``, the strongest within 1 point of the best). WiSE-FT interpolates LP-FT's run
(start = pretrained backbone + probe head) and picks ``a`` on the ID val split.

    python benchmarks/robust_finetune.py --seeds 0 1 2 --epochs 8 --threads 1 --json r.json --plot docs/robust_finetune.png
    python benchmarks/robust_finetune.py --from-json r0.json r1.json r2.json     # tables from (partial) runs
    python benchmarks/robust_finetune.py --quick                                 # smoke: seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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

# Every forgetting-control method keeps the pretrained BatchNorm statistics (their configs ship
# `keep_bn_statistics: true`): they exist to keep the pretrained function, and re-estimated
# statistics erase it before any weight moves (README). Plain FT runs both ways so the comparison
# is fair: as its config ships (statistics re-estimated, the usual fine-tuning) and with them kept.
KEEP = {"keep_bn_statistics": True}
METHODS = {  # paper defaults (see tl_lightning/regularizers.py); track_forgetting keeps the start
    "plain FT": {"track_forgetting": True},  # configs/robust/plain.yaml as shipped
    "plain FT, BN kept": {"track_forgetting": True, **KEEP},
    "LP-FT": {"init_head": "probe", **KEEP},
    "L2-SP": {"l2sp_alpha": 0.1, "l2sp_beta": 0.01, **KEEP},
    "LwF": {"lwf_alpha": 1.0, "lwf_temperature": 2.0, **KEEP},
    # the methods with the statistics re-estimated (the previous run's setting), for comparison
    "LP-FT, BN train": {"init_head": "probe"},
    "L2-SP, BN train": {"l2sp_alpha": 0.1, "l2sp_beta": 0.01},
    "LwF, BN train": {"lwf_alpha": 1.0, "lwf_temperature": 2.0},
}
DEFAULT_METHODS = ["plain FT", "plain FT, BN kept", "L2-SP", "LP-FT", "LwF"]
ORDER = (
    "plain FT", "plain FT, BN kept", "LP", "LP-FT", "L2-SP", "LwF", "WiSE-FT",
    "LP, BN train", "LP-FT, BN train", "L2-SP, BN train", "LwF, BN train", "WiSE-FT, BN train",
)


class ProbeTime(Callback):
    """Seconds of LP-FT's first stage: from fit start to the first training batch."""

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.s = time.perf_counter() - self.t0


def evaluate(backbone, head, id_loader, ood_loader, reference, start) -> dict:
    out = {"id": accuracy(backbone, head, id_loader), "ood": accuracy(backbone, head, ood_loader)}
    out.update(reference.measure(backbone, start))
    out["digits_agreement"] = source_agreement_on(backbone, start, id_loader)
    return out


@torch.no_grad()
def source_agreement_on(backbone, start, loader) -> float:
    """Source agreement on the ID test digits themselves (where LwF distils), not the reference photos."""
    same = total = 0
    for batch in loader:
        x = batch[0]
        same += int((start.source_head(backbone(x)).argmax(1) == start.source_logits(x).argmax(1)).sum())
        total += len(x)
    return same / total


def choose(candidates: list[dict], rule: str) -> dict:
    """The candidate the rule picks from ID **val** accuracy only (never test, never OOD).

    ``best``: the highest val accuracy (ties: the first in the grid). ``strongest``: the first
    candidate (grids of regularisers run strongest first) within 1 point of the best val accuracy,
    i.e. the most regularisation the ID task tolerates.
    """
    best = max(c["val"] for c in candidates)
    if rule == "best":
        return next(c for c in candidates if c["val"] == best)
    return next(c for c in candidates if c["val"] >= best - 0.01)


def fit(name: str, overrides: dict, seed: int, args, dm):
    extra = {**METHODS[name], **{k: v for k, v in overrides.items() if k != "lr"}}
    seed_everything(seed, workers=True)
    model = FineTuneModule(
        num_classes=10,
        head_dropout=0.2,
        label_smoothing=0.1,
        optimizer=functools.partial(torch.optim.AdamW, lr=overrides.get("lr", args.lr), weight_decay=0.01),
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
        limit_val_batches=0,  # no model selection on anything: every run trains the same epochs
        limit_train_batches=6 if args.quick else 1.0,
        callbacks=[probe_time],
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    model.eval()
    return model, time.perf_counter() - t0, probe_time


def run_seed(seed: int, args, reference: ReferenceSet, save) -> dict[str, dict]:
    data = dict(backbone="efficientnet_lite0", image_size=args.image_size, batch_size=64, augment="none", seed=0)
    dm = DigitsDataModule(**data)
    # the same test digits (same split seed and fractions), blended onto photo patches
    ood = DigitsMDataModule(**data, part="all", blend=True)
    dm.setup("fit")
    ood.setup("test")
    id_loader, ood_loader, val_loader = dm.test_dataloader(), ood.test_dataloader(), dm.val_dataloader()
    assert torch.equal(torch.as_tensor(dm.test_set.labels), torch.as_tensor(ood.test_set.labels))
    # hyperparameters chosen per seed on the ID val split: LP-FT's fine-tuning LR (Kumar et al.
    # fine-tune after the probe with a smaller LR than plain FT), LwF's alpha (strongest within 1 point)
    grids = {
        "LP-FT": ("lr", args.lpft_lrs, "best"),
        "LwF": ("lwf_alpha", args.lwf_alphas, "strongest"),
    }
    rows: dict[str, dict] = {}
    printed: set[str] = set()
    for name in args.methods:
        key, values, rule = grids.get(name.removesuffix(", BN train"), (None, [None], "best"))
        candidates, runs = [], []
        for value in values:
            overrides = {} if key is None else {key: value}
            model, seconds, probe_time = fit(name, overrides, seed, args, dm)
            candidates.append({"value": value, "val": accuracy(model.backbone, model.head, val_loader), "seconds": seconds})
            runs.append((model, seconds, probe_time))  # a few MB each: keep them until the choice
            if key is not None:
                print(f"seed {seed} {name} {key}={value:g}: ID val acc {candidates[-1]['val']:.4f} ({seconds:.0f} s)", flush=True)
        chosen = choose(candidates, rule)
        model, seconds, probe_time = runs[candidates.index(chosen)]
        del runs
        selection = None
        if key is not None:
            selection = {"key": key, "rule": rule, "chosen": chosen["value"], "candidates": candidates,
                         "seconds": sum(c["seconds"] for c in candidates)}
        suffix = name.removeprefix("LP-FT")  # LP-FT rows: "" or ", BN train"
        if name.startswith("LP-FT"):  # the probe alone (LP): the starting backbone with the probe's head
            rows["LP" + suffix] = evaluate(model.start.backbone, model.start.head, id_loader, ood_loader, reference, model.start)
            rows["LP" + suffix]["seconds"] = probe_time.s
        rows[name] = evaluate(model.backbone, model.head, id_loader, ood_loader, reference, model.start)
        rows[name].update(seconds=seconds, val=chosen["val"], selection=selection)
        if name.startswith("LP-FT"):
            t1 = time.perf_counter()
            result = wise_ft(model, val_loader, reference=reference)  # a chosen on ID val only
            rows["WiSE-FT" + suffix] = evaluate(model.backbone, model.head, id_loader, ood_loader, reference, model.start)
            rows["WiSE-FT" + suffix].update(seconds=seconds + time.perf_counter() - t1, a=result.a, curve=result.curve)
        for row in [k for k in rows if k not in printed]:
            printed.add(row)
            print(f"seed {seed} {row}: " + json.dumps({k: v for k, v in rows[row].items() if k not in ("curve", "selection")}), flush=True)
        save(rows)  # a partial run is still usable (--from-json)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lpft-lrs", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4],
                        help="LP-FT's fine-tuning LR grid, chosen per seed on ID val (one value: no choice)")
    parser.add_argument("--lwf-alphas", type=float, nargs="+", default=[1.0, 0.3, 0.1],
                        help="LwF alpha grid, strongest first; the strongest within 1 point of the best ID val accuracy")
    parser.add_argument("--reference-images", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--json", default=None, help="write every number here, after every row")
    parser.add_argument("--from-json", nargs="+", default=None, help="only print tables/plot from these result files")
    parser.add_argument("--plot", default=None, help="write accuracy-vs-source-agreement plot (PNG) here")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 epoch of 6 batches, 8 reference images")
    add_threads_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.reference_images = args.seeds[:1], 1, 8
        args.lpft_lrs, args.lwf_alphas = args.lpft_lrs[:2], args.lwf_alphas[:2]
    apply_threads(args.threads)
    quiet_lightning()
    print_header("Robust fine-tuning: EfficientNet-Lite0, digits (ID) -> digits-M (OOD)")
    if args.from_json:
        results = {}
        for path in args.from_json:
            with open(path) as f:
                for s, r in json.load(f).items():  # files may hold different rows of one seed
                    merge(results.setdefault(int(s), {}), r)
        report(results, args)
        return
    lite0 = FineTuneModule(num_classes=10).backbone.data_config
    reference = ReferenceSet.default(lite0, args.reference_images)
    results: dict[int, dict] = {}

    def save(rows):
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump({str(s): r for s, r in {**results, seed: rows}.items()}, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    for seed in args.seeds:
        results[seed] = run_seed(seed, args, reference, save)
    report(results, args)


def merge(rows: dict, new: dict) -> None:
    """Add one file's rows of a seed; a method's grid run in pieces (one value per process) is chosen again.

    Two runs of a method with a choice (e.g. LP-FT at lr 1e-3 and at 1e-4, run in parallel) are
    merged by the same rule on their ID val accuracies; the winner's rows (LP-FT, and with it LP
    and WiSE-FT) are kept and the selection lists every candidate.
    """
    for name, row in new.items():
        if name not in rows:
            rows[name] = row
            continue
        sel, old = row.get("selection"), rows[name].get("selection")
        if not (sel and old and sel["key"] == old["key"]):
            continue  # LP and WiSE-FT follow their LP-FT run (below); otherwise the first file wins
        candidates = old["candidates"] + sel["candidates"]
        chosen = choose(candidates, sel["rule"])
        if chosen not in old["candidates"]:  # the new run wins: its rows replace the old ones
            suffix = name.removeprefix("LP-FT")
            for derived in ["LP" + suffix, "WiSE-FT" + suffix] if name.startswith("LP-FT") else []:
                if derived in new:
                    rows[derived] = new[derived]
            rows[name] = row
        rows[name]["selection"] = {**sel, "chosen": chosen["value"], "candidates": candidates,
                                   "seconds": old["seconds"] + sel["seconds"]}


def report(results: dict[int, dict], args) -> None:
    seeds = sorted(results)
    common = set.intersection(*(set(results[s]) for s in seeds))
    rows = [r for r in ORDER if r in common]
    missing = sorted(set.union(*(set(results[s]) for s in seeds)) - common)
    if missing:
        print(f"rows not run on every seed (left out): {missing}\n")

    def col(row, key):
        return [results[s][row][key] for s in seeds]

    table = []
    for row in rows:
        sel = [results[s][row].get("selection") for s in seeds]
        chosen = ", ".join(f"{x['chosen']:g}" for x in sel) if all(sel) else ""
        if row.startswith("WiSE-FT"):
            chosen = "a = " + ", ".join(f"{a:g}" for a in col(row, "a"))
        table.append(
            [
                row,
                mean_std(col(row, "id")),
                mean_std(col(row, "ood")),
                mean_std(col(row, "source_agreement")),
                mean_std(col(row, "cka_drift")),
                mean_std(col(row, "digits_agreement")),
                f"{statistics.mean(col(row, 'seconds')):.0f}",
                chosen,
            ]
        )
    print(f"mean +- std over seeds {seeds}; {args.epochs} epochs at {args.image_size} px\n")
    print_table(["method", "ID test acc", "OOD (digits-M) acc", "source agreement", "CKA drift", "source agreement on digits", "seconds", "chosen on ID val"], table)
    per_seed = [
        [s, *(f"{results[s][r]['id']:.3f} / {results[s][r]['ood']:.3f} / {results[s][r]['source_agreement']:.2f}" for r in rows)]
        for s in seeds
    ]
    print("per seed: ID / OOD / source agreement\n")
    print_table(["seed", *rows], per_seed)
    selections(results, seeds, rows)
    for wise in ("WiSE-FT", "WiSE-FT, BN train"):
        if wise in rows:
            wise_path(results, seeds, wise)
    for baseline in ("plain FT", "plain FT, BN kept"):
        if all(r in rows for r in (baseline, "LP-FT", "L2-SP", "LwF", "WiSE-FT")):
            targets(results, seeds, baseline)
    agree = [results[s][r]["source_agreement"] for s in seeds for r in rows]
    ood = [results[s][r]["ood"] for s in seeds for r in rows]
    print(f"correlation over all rows and seeds, source agreement vs OOD accuracy: {_pearson(agree, ood):+.2f}\n")
    if args.plot:
        plot(results, seeds, rows, args.plot)


def selections(results, seeds, rows) -> None:
    lines = []
    for row in rows:
        for s in seeds:
            sel = results[s][row].get("selection")
            if sel:
                vals = ", ".join(f"{c['value']:g}: {c['val']:.3f}" for c in sel["candidates"])
                lines.append([row, s, sel["key"], sel["rule"], vals, f"{sel['chosen']:g}", f"{sel['seconds']:.0f}"])
    if lines:
        print("choices made on the ID val split (value: ID val accuracy)\n")
        print_table(["method", "seed", "hyperparameter", "rule", "candidates", "chosen", "seconds, all candidates"], lines)


def wise_path(results, seeds, row) -> None:
    print(f"{row} path (seed mean; a chosen on ID val)\n")
    grid = [r["a"] for r in results[seeds[0]][row]["curve"]]
    path = []
    for i, a in enumerate(grid):
        curves = [results[s][row]["curve"][i] for s in seeds]
        path.append([f"{a:g}", *(f"{statistics.mean(c[k] for c in curves):.3f}" for k in ("val_acc", "source_agreement", "cka_drift"))])
    print_table(["a", "ID val acc", "source agreement", "CKA drift"], path)


def targets(results, seeds, base) -> None:
    def mean(row, key):
        return statistics.mean(results[s][row][key] for s in seeds)

    def fmt(row, key):
        return f"{mean(row, key):.3f} vs {mean(base, key):.3f}"

    lines = [
        ("LP-FT OOD > baseline OOD on every seed", all(results[s]["LP-FT"]["ood"] > results[s][base]["ood"] for s in seeds),
         ", ".join(f"{results[s]['LP-FT']['ood']:.3f} vs {results[s][base]['ood']:.3f}" for s in seeds)),
        # "within": at most that far below the baseline (above it is no miss)
        ("LP-FT ID within 0.5 points", mean("LP-FT", "id") >= mean(base, "id") - 0.005, fmt("LP-FT", "id")),
        ("L2-SP source agreement >= 2x", _at_least_twice(mean("L2-SP", "source_agreement"), mean(base, "source_agreement")), fmt("L2-SP", "source_agreement")),
        ("L2-SP ID within 1 point", mean("L2-SP", "id") >= mean(base, "id") - 0.01, fmt("L2-SP", "id")),
        ("LwF source agreement >= 2x", _at_least_twice(mean("LwF", "source_agreement"), mean(base, "source_agreement")), fmt("LwF", "source_agreement")),
        ("LwF ID within 1 point", mean("LwF", "id") >= mean(base, "id") - 0.01, fmt("LwF", "id")),
        ("WiSE-FT OOD > baseline OOD", mean("WiSE-FT", "ood") > mean(base, "ood"), fmt("WiSE-FT", "ood")),
    ]
    print(f"targets against **{base}** (mean over seeds unless per seed)\n")
    print_table(["target", "met", "numbers"], [[t, "yes" if ok else "**no**", n] for t, ok, n in lines])


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
    for i, row in enumerate(rows):
        for ax, key in zip(axes, ("id", "ood")):
            xs = [results[s][row]["source_agreement"] for s in seeds]
            ys = [results[s][row][key] for s in seeds]
            ax.scatter(xs, ys, label=row, marker="o^sxDv+*"[i % 8], s=45)  # markers: coinciding rows stay visible
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
