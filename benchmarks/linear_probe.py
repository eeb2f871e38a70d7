"""The L-BFGS linear probe: ours in torch vs scikit-learn's on the same cached features, and the
whole cold fit vs the seeds' 10-epoch recompute-every-epoch loop.

Protocol (the one of benchmarks/feature_extraction.py, whose seeds' loop and datamodule this reuses):
scikit-learn digits at 64 px, stratified 60/20/20 split (seed 0: 1,077 train, 360 val, 360 test
images), offline ImageNet EfficientNet-Lite0, fp32 + channels_last, seed 0.

1. Cold fit. ``FeatureExtractionModule(probe="lbfgs")`` in the Lightning Trainer from an empty cache
   directory: caching the train and validation features (one backbone pass), the L-BFGS sweep, one
   validation epoch and the stop are all inside the clock. Beside it: the seeds' loop for 10 epochs
   (every image through the backbone every epoch, validation each epoch) and, as the ceiling of any
   cached method, one plain backbone pass over the same train + validation images.
2. Probe alone, on the cached features from (1): ``sweep_logistic_regression`` (warm-started along
   the grid, centres internally, float32 products with float64 loss and L-BFGS state) against ``sklearn.linear_model.LogisticRegression(solver="lbfgs",
   C=1/(n*l2), max_iter=1000)`` over the same grid, choosing ``l2`` on validation accuracy, on the
   raw features and on centred ones (centring is exact for an unregularised bias and helps L-BFGS),
   cold as users call it and warm-started (``warm_start=True``) like ours. Test accuracy of the
   chosen head on the cached test features.

    python benchmarks/linear_probe.py --threads 1
    python benchmarks/linear_probe.py --quick        # 32 px, a 3-point grid, 2 seeds' epochs
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import feature_extraction as fe
import numpy as np
import torch
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
from torch.utils.data import DataLoader

from tl_lightning.backbones import build_backbone
from tl_lightning.modules import FeatureExtractionModule
from tl_lightning.probe import DEFAULT_GRID, sweep_logistic_regression


def run_ours_cold(cache_dir: str, grid: list[float]):
    """Seconds of the cold ``trainer.fit``, test accuracy, the cached features, the sweep."""
    seed_everything(fe.SEED, verbose=False)
    dm = fe.datamodule()
    dm.setup("fit")  # in-memory digits outside the clock, as for the seeds' loop
    model = FeatureExtractionModule(
        num_classes=10, backbone=fe.BACKBONE, cache_dir=cache_dir, probe="lbfgs", probe_grid=grid
    )
    trainer = Trainer(max_epochs=10, precision=fe.PRECISION, **bare_trainer_kwargs())
    with timer() as t:
        trainer.fit(model, datamodule=dm)
    features = {"train": arrays(dm.train_set), "val": arrays(dm.val_set)}  # the cached ones
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    features["test"] = arrays(dm.test_set)
    return t["s"], float(acc), features, model.probe_result


@torch.no_grad()
def backbone_pass_seconds() -> float:
    """One forward pass over the train + validation images: what any cold cached fit must pay."""
    dm = fe.datamodule()
    dm.setup("fit")
    backbone = build_backbone(fe.BACKBONE).eval().to(memory_format=torch.channels_last)
    with timer() as t:
        for split in (dm.train_set, dm.val_set):
            for x, _ in DataLoader(split, batch_size=fe.BATCH):
                with forward_context(fe.PRECISION):
                    backbone(x.contiguous(memory_format=torch.channels_last))
    return t["s"]


def arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    return np.array(dataset.features, dtype=np.float32), np.array(dataset.labels)


def sklearn_sweep(xtr, ytr, xval, yval, xte, yte, grid, warm: bool):
    """scikit-learn over the same grid (strongest first), l2 chosen on validation accuracy."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n = len(ytr)
    best = (-1.0, None, None)
    clf = LogisticRegression(solver="lbfgs", max_iter=1000, warm_start=warm)
    unconverged = 0
    with warnings.catch_warnings(record=True) as caught, timer() as t:
        warnings.simplefilter("always", ConvergenceWarning)
        for l2 in sorted(grid, reverse=True):
            clf.set_params(C=1.0 / (n * l2))
            clf.fit(xtr, ytr)
            acc = float((clf.predict(xval) == yval).mean())
            if acc > best[0]:
                best = (acc, l2, float((clf.predict(xte) == yte).mean()))
    unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return t["s"], best, unconverged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 px, 3-point grid, 2 seeds' epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--skip-seeds", action="store_true", help="probe comparison only")
    add_threads_arg(parser)
    args = parser.parse_args()
    threads = apply_threads(args.threads)
    fe.SEED, fe.PRECISION = args.seed, args.precision
    fe.SIZE = 32 if args.quick else 64
    grid = [1e-4, 1e-3, 1e-2] if args.quick else list(DEFAULT_GRID)
    seeds_epochs = 2 if args.quick else 10
    quiet_lightning()
    # the first torch optimizer built in a process imports torch._dynamo (1-4 s here); every
    # method below builds one, so pay that once before any clock, not inside the first method's
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    print_header("Linear probe: L-BFGS in torch vs scikit-learn vs the seeds' loop")
    print(
        f"digits at {fe.SIZE} px, {fe.BACKBONE}, {fe.PRECISION} + channels_last, seed {fe.SEED}, "
        f"grid of {len(grid)} l2 strengths {grid[0]:.0e} .. {grid[-1]:.0e}\n"
    )

    with tempfile.TemporaryDirectory() as cache:
        cold_s, cold_acc, features, result = run_ours_cold(cache, grid)
        print(
            f"  ours cold: {cold_s:.2f} s, test acc {cold_acc:.4f}, l2 {result.l2:.3g}", flush=True
        )
        (xtr, ytr), (xval, yval), (xte, yte) = features["train"], features["val"], features["test"]
    pass_s = backbone_pass_seconds()
    print(f"  one backbone pass over train + val: {pass_s:.2f} s", flush=True)
    if not args.skip_seeds:
        seeds_s, seeds_acc = fe.run_seeds([seeds_epochs], "eval")[seeds_epochs]
        print_table(
            [
                "method",
                "seconds",
                "seeds' loop / this",
                "test acc (%)",
            ],
            [
                [
                    f"seeds' loop, {seeds_epochs} epochs (AdamW 1e-3)",
                    fmt(seeds_s),
                    "1.0x",
                    fmt(100 * seeds_acc, 1),
                ],
                [
                    "ours: cold `probe: lbfgs` fit (cache + sweep + validate)",
                    fmt(cold_s),
                    f"**{seeds_s / cold_s:.1f}x**",
                    fmt(100 * cold_acc, 2),
                ],
                [
                    "ceiling: one backbone pass over train + val",
                    fmt(pass_s),
                    f"{seeds_s / pass_s:.1f}x",
                    "-",
                ],
            ],
        )

    t_tr, t_val, t_te = (torch.from_numpy(a) for a in (xtr, xval, xte))
    y_tr, y_val = torch.from_numpy(ytr), torch.from_numpy(yval)
    with timer() as t:
        ours = sweep_logistic_regression(t_tr, y_tr, t_val, y_val, 10, grid=grid)
    ours_test = float(((t_te @ ours.weight.T + ours.bias).argmax(1).numpy() == yte).mean())
    rows = [
        [
            "ours: torch L-BFGS (centred, warm-started)",
            fmt(t["s"]),
            "1.00x",
            f"{ours.l2:.0e}",
            fmt(100 * ours.val_acc, 2),
            fmt(100 * ours_test, 2),
            "-",
        ]
    ]
    mu = xtr.mean(0)
    for name, shift in (("raw", 0.0), ("centred", mu)):
        for warm in (False, True):
            s, (val_acc, l2, test_acc), unconverged = sklearn_sweep(
                (xtr - shift).astype(np.float64),
                ytr,
                xval - shift,
                yval,
                xte - shift,
                yte,
                grid,
                warm,
            )
            label = f"scikit-learn lbfgs, {name} features, {'warm' if warm else 'cold'} start"
            print(f"  {label}: {s:.2f} s", flush=True)
            rows.append(
                [
                    label,
                    fmt(s),
                    f"{s / t['s']:.2f}x",
                    f"{l2:.0e}",
                    fmt(100 * val_acc, 2),
                    fmt(100 * test_acc, 2),
                    f"{unconverged}/{len(grid)}",
                ]
            )
    print(
        f"Probe alone on the cached features ({len(ytr)} train x {xtr.shape[1]} dims, torch threads {threads}):\n"
    )
    print_table(
        [
            "probe",
            "sweep seconds",
            "time / ours",
            "chosen l2",
            "val acc (%)",
            "test acc (%)",
            "fits hitting max_iter",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
