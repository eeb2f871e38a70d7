"""The L-BFGS linear probe: ours in torch vs scikit-learn's on the same cached features, and the
whole cold fit vs the seeds' 10-epoch recompute-every-epoch loop, in fp32 and in the precision a
user gets by default (``precision: mixed``: bf16 autocast on a CPU with AVX-512 BF16 / AMX).

Protocol (the one of benchmarks/feature_extraction.py, whose seeds' loop and datamodule this reuses):
scikit-learn digits at 64 px, stratified 60/20/20 split (seed 0: 1,077 train, 360 val, 360 test
images), offline ImageNet EfficientNet-Lite0, channels_last, seed 0.

1. Cold fit. ``FeatureExtractionModule(probe="lbfgs")`` in the Trainer from an empty cache
   directory: caching the train and validation features (one backbone pass), the L-BFGS sweep, one
   validation epoch and the stop are all inside the clock; once with ``precision="32-true"`` and
   once with ``precision="mixed"`` (resolved by :class:`tl_lightning.precision.TLTrainer`; run only
   where torch's CPU capability is AVX512 or where a GPU is used). Beside them: the seeds' loop in
   fp32 for 10 epochs (every image through the backbone every epoch, validation each epoch) and, as
   the ceiling of any cached method, one plain backbone pass over the same train + validation
   images in each precision.
2. Probe alone, on the cached features of each precision from (1): ``sweep_logistic_regression``
   against ``sklearn.linear_model.LogisticRegression(solver="lbfgs", C=1/(n*l2), tol=--tol,
   max_iter=1000)`` over the same grid, on the raw features and on centred ones, cold (as users
   call it) and warm-started (``warm_start=True``) like ours. Every method picks ``l2`` the same
   way: the best validation accuracy, ties to the stronger regularisation (the grid runs strongest
   first and only a strictly better accuracy replaces the choice). Test accuracy of the chosen head.
   ``--tol`` is the same for ours and scikit-learn's (max |gradient| of the mean-scaled objective).

    python benchmarks/linear_probe.py --threads 1
    python benchmarks/linear_probe.py --threads 1 --tol 1e-4   # scikit-learn's default tol
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
    load_avg,
    print_header,
    print_table,
    quiet_lightning,
    timer,
)
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader

from tl_lightning.backbones import build_backbone
from tl_lightning.modules import FeatureExtractionModule
from tl_lightning.precision import TLTrainer
from tl_lightning.probe import DEFAULT_GRID, sweep_logistic_regression


def run_ours_cold(cache_dir: str, grid: list[float], precision: str):
    """Seconds of the cold ``trainer.fit`` (the module's default ``probe_tol``), the resolved
    precision, test accuracy, the cached features and the sweep."""
    seed_everything(fe.SEED, verbose=False)
    dm = fe.datamodule()
    dm.setup("fit")  # in-memory digits outside the clock, as for the seeds' loop
    model = FeatureExtractionModule(
        num_classes=10,
        backbone=fe.BACKBONE,
        cache_dir=cache_dir,
        probe="lbfgs",
        probe_grid=grid,
    )
    trainer = TLTrainer(max_epochs=10, precision=precision, **bare_trainer_kwargs())
    with timer() as t:
        trainer.fit(model, datamodule=dm)
    features = {"train": arrays(dm.train_set), "val": arrays(dm.val_set)}  # the cached ones
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    features["test"] = arrays(dm.test_set)
    return t["s"], str(trainer.precision), float(acc), features, model.probe_result


@torch.no_grad()
def backbone_pass_seconds(precision: str) -> float:
    """One forward pass over the train + validation images: what any cold cached fit must pay."""
    dm = fe.datamodule()
    dm.setup("fit")
    backbone = build_backbone(fe.BACKBONE).eval().to(memory_format=torch.channels_last)
    with timer() as t:
        for split in (dm.train_set, dm.val_set):
            for x, _ in DataLoader(split, batch_size=fe.BATCH):
                with forward_context(precision):
                    backbone(x.contiguous(memory_format=torch.channels_last))
    return t["s"]


def arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    return np.array(dataset.features, dtype=np.float32), np.array(dataset.labels)


def sklearn_sweep(xtr, ytr, xval, yval, xte, yte, grid, warm: bool, tol: float):
    """scikit-learn over the same grid, strongest first; ``l2`` chosen on validation accuracy,
    ties to the stronger regularisation (only a strictly better accuracy replaces the choice)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n = len(ytr)
    best = (-1.0, None, None)
    clf = LogisticRegression(solver="lbfgs", max_iter=1000, warm_start=warm, tol=tol)
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


def bf16_allowed() -> bool:
    """bf16 autocast on this CPU only where torch dispatches its AVX-512 kernels (never on AVX2,
    where it is 3-16x slower than fp32, BENCHMARKS.md "Precision")."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


VARIANTS = ("raw-cold", "raw-warm", "centred-cold", "centred-warm")


def probe_rows(
    features, grid: list[float], tol: float, label: str, variants=VARIANTS
) -> list[list[str]]:
    """Ours vs the scikit-learn ``variants`` on one precision's cached features."""
    (xtr, ytr), (xval, yval), (xte, yte) = features["train"], features["val"], features["test"]
    t_tr, t_val, t_te = (torch.from_numpy(a) for a in (xtr, xval, xte))
    y_tr, y_val = torch.from_numpy(ytr), torch.from_numpy(yval)
    with timer() as t:
        ours = sweep_logistic_regression(t_tr, y_tr, t_val, y_val, 10, grid=grid, tol=tol)
    ours_test = float(((t_te @ ours.weight.T + ours.bias).argmax(1).numpy() == yte).mean())
    print(f"  [{label}] ours: {t['s']:.2f} s, l2 {ours.l2:.0e}", flush=True)
    rows = [
        [
            label,
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
            if f"{name}-{'warm' if warm else 'cold'}" not in variants:
                continue
            s, (val_acc, l2, test_acc), unconverged = sklearn_sweep(
                (xtr - shift).astype(np.float64),
                ytr,
                xval - shift,
                yval,
                xte - shift,
                yte,
                grid,
                warm,
                tol,
            )
            method = f"scikit-learn lbfgs, {name} features, {'warm' if warm else 'cold'} start"
            print(f"  [{label}] {method}: {s:.2f} s, l2 {l2:.0e}", flush=True)
            rows.append(
                [
                    label,
                    method,
                    fmt(s),
                    f"{s / t['s']:.2f}x",
                    f"{l2:.0e}",
                    fmt(100 * val_acc, 2),
                    fmt(100 * test_acc, 2),
                    f"{unconverged}/{len(grid)}",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 px, 3-point grid, 2 seeds' epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tol",
        type=float,
        nargs="+",
        default=[1e-4, 1e-8],
        help="probe-alone tables: max |gradient| at which every fit stops, ours and "
        "scikit-learn's alike (1e-4: scikit-learn's default; 1e-8: converged)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="scikit-learn runs: raw or centred features, cold or warm start along the grid",
    )
    parser.add_argument("--skip-seeds", action="store_true", help="no seeds' loop")
    parser.add_argument("--fp32-only", action="store_true", help="no precision: mixed run")
    add_threads_arg(parser)
    args = parser.parse_args()
    threads = apply_threads(args.threads)
    fe.SEED = args.seed
    fe.SIZE = 32 if args.quick else 64
    grid = [1e-4, 1e-3, 1e-2] if args.quick else list(DEFAULT_GRID)
    seeds_epochs = 2 if args.quick else 10
    quiet_lightning()
    # the first torch optimizer built in a process imports torch._dynamo (1-4 s here); every
    # method below builds one, so pay that once before any clock, not inside the first method's
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    print_header("Linear probe: L-BFGS in torch vs scikit-learn vs the seeds' loop")
    print(
        f"digits at {fe.SIZE} px, {fe.BACKBONE}, channels_last, seed {fe.SEED}, grid of "
        f"{len(grid)} l2 strengths {grid[0]:.0e} .. {grid[-1]:.0e}, torch CPU "
        f"capability {torch.backends.cpu.get_cpu_capability()}\n"
    )
    precisions = ["32-true"]
    if args.fp32_only:
        pass
    elif bf16_allowed():
        precisions.append("mixed")
    else:
        print("  precision: mixed skipped: torch's CPU capability is not AVX512\n")

    cold, features = {}, {}
    for precision in precisions:
        with tempfile.TemporaryDirectory() as cache:
            s, resolved, acc, feats, result = run_ours_cold(cache, grid, precision)
        pass_s = backbone_pass_seconds(resolved)
        cold[precision] = (s, resolved, acc, pass_s, result)
        features[resolved] = feats
        print(
            f"  ours cold, precision {precision} ({resolved}): {s:.2f} s, test acc {acc:.4f}, "
            f"l2 {result.l2:.3g}; one backbone pass over train + val: {pass_s:.2f} s "
            f"(load {load_avg()})",
            flush=True,
        )
    if not args.skip_seeds:
        fe.PRECISION = "32-true"
        seeds_s, seeds_acc = fe.run_seeds([seeds_epochs], "eval")[seeds_epochs]
        print(f"  (load {load_avg()})", flush=True)
        rows = [
            [f"seeds' loop, {seeds_epochs} epochs (AdamW 1e-3)", "32-true", fmt(seeds_s), "1.0x"]
            + [fmt(100 * seeds_acc, 1)]
        ]
        for precision, (s, resolved, acc, pass_s, _) in cold.items():
            name = "`mixed` (the default)" if precision == "mixed" else precision
            rows.append(
                [
                    f"ours: cold `probe: lbfgs` fit, precision {name}",
                    resolved,
                    fmt(s),
                    f"**{seeds_s / s:.1f}x**",
                    fmt(100 * acc, 2),
                ]
            )
            rows.append(
                ["ceiling: one backbone pass over train + val", resolved, fmt(pass_s)]
                + [f"{seeds_s / pass_s:.1f}x", "-"]
            )
        print_table(["method", "precision", "seconds", "seeds' loop / this", "test acc (%)"], rows)

    n, d = features["32-true"]["train"][0].shape
    for tol in args.tol:
        rows = []
        for resolved, feats in features.items():
            rows += probe_rows(feats, grid, tol, resolved, args.variants)
        print(
            f"Probe alone on the cached features ({n} train x {d} dims, tol {tol:g} for every "
            f"fit, torch threads {threads}, load {load_avg()}):\n"
        )
        print_table(
            [
                "features",
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
