"""The advice's k-fold linear probe: closed-form ridge vs the L-BFGS logistic probe it replaced.

Same six settings as ``benchmarks/advise.py`` (digits / digits-M, training split at 10 / 30 / 100 %,
32 px, EfficientNet-Lite0), the same embedded training split and the same folds for both:

- ``logistic``: the previous probe, L2 logistic regression by L-BFGS (100 iterations per fit),
  strength from {1e-4, 1e-3, 1e-2} picked on a stratified fifth of the first fold's training
  part, reused in every fold;
- ``ridge``: :func:`tl_lightning.advisor.distance.kfold_probe_accuracy`, ridge on one-hot
  targets, strength picked by exact leave-one-out in the first fold's training part.

Both are run once on tiny data first, so one-time start-up costs are not counted in either.

    python benchmarks/advise_probe.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import apply_threads, print_header, print_table, quiet_lightning  # noqa: E402
from advise import subset_datamodule  # noqa: E402


def logistic_kfold(features, labels, num_classes, folds, seed=0) -> float:
    """The advice's previous probe, verbatim (tl_lightning/advisor/distance.py before the ridge)."""
    import numpy as np

    from tl_lightning.advisor.distance import fold_indices
    from tl_lightning.data.split import stratified_split
    from tl_lightning.probe import fit_logistic_regression, sweep_logistic_regression

    y = labels.numpy()
    parts = fold_indices(y, folds, seed)
    correct, l2 = 0, None
    for k, held in enumerate(parts):
        rest = np.concatenate([p for j, p in enumerate(parts) if j != k])
        if l2 is None:
            fit, val = (rest[i] for i in stratified_split(y[rest], (0.8, 0.2), seed))
            l2 = sweep_logistic_regression(
                features[fit],
                labels[fit],
                features[val],
                labels[val],
                num_classes,
                grid=(1e-4, 1e-3, 1e-2),
                max_iter=100,
            ).l2
        weight, bias = fit_logistic_regression(
            features[rest], labels[rest], num_classes, l2, max_iter=100
        )
        correct += int(((features[held] @ weight.T + bias).argmax(1) == labels[held]).sum())
    return correct / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--datasets", nargs="+", default=["digits", "digits_m"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    apply_threads(args.threads)
    quiet_lightning()
    import torch

    from tl_lightning.advisor.advise import embed_train_split
    from tl_lightning.advisor.distance import choose_folds, kfold_probe_accuracy
    from tl_lightning.backbones import build_backbone
    from tl_lightning.precision import mixed_precision_for

    print_header(f"advice probe: ridge vs L-BFGS logistic ({args.image_size} px)")
    g = torch.Generator().manual_seed(0)
    tiny_x, tiny_y = torch.randn(30, 8, generator=g), torch.arange(3).repeat(10)
    logistic_kfold(tiny_x, tiny_y, 3, 3)  # one-time start-up costs, paid outside the timings
    kfold_probe_accuracy(tiny_x, tiny_y, 3, 3)
    rows = []
    for dataset in args.datasets:
        for fraction in args.fractions:
            with tempfile.TemporaryDirectory() as tmp:
                dm = subset_datamodule(dataset, fraction, args.image_size)
                dm.prepare_data()
                dm.setup("fit")
                bb = build_backbone(dm.hparams.backbone, weights=dm.hparams.weights)
                x, y = embed_train_split(
                    bb, dm, mixed_precision_for("cpu"), torch.device("cpu"), tmp
                )
            k = choose_folds(y.numpy(), 5)
            start = time.perf_counter()
            old = logistic_kfold(x, y, dm.num_classes, k)
            t_old = time.perf_counter() - start
            start = time.perf_counter()
            new = kfold_probe_accuracy(x, y, dm.num_classes, k)
            t_new = time.perf_counter() - start
            rows.append(
                [
                    f"{dataset} {fraction:.0%} (n={len(y)})",
                    f"{old:.3f}",
                    f"{new:.3f}",
                    f"{100 * (new - old):+.1f}",
                    f"{t_old:.2f}",
                    f"{t_new:.3f}",
                    f"{t_old / t_new:.0f}x",
                ]
            )
            print(f"done: {rows[-1]}", flush=True)
    print("\nk-fold probe accuracy on the training split and seconds, side by side:\n")
    print_table(
        [
            "setting",
            "logistic (L-BFGS)",
            "ridge (closed form)",
            "ridge - logistic (points)",
            "logistic s",
            "ridge s",
            "speed-up",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
