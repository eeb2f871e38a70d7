"""Does ``tl-lightning predict`` stream? Peak memory over 1k vs 10k images, and throughput.

N tiny JPEGs (32 px, quality 90, random colours) are written to a temporary folder, then
``tl-lightning predict`` runs on them in a fresh child process with a random-init ``conv4``
``FineTuneModule`` (no checkpoint: memory, not accuracy, is measured), digits preprocessing at
32 px, batch 64, no loader workers, predictions streamed to CSV. Each child's peak RSS comes from
``getrusage(RUSAGE_CHILDREN)`` in a one-child wrapper process (exact, no polling). Images/s is the
marginal rate between the two sizes, so interpreter start-up and imports cancel out.

Rows "stream" use the CLI default; rows "keep" pass ``--return_predictions=true`` (Lightning's own
default, which holds every prediction until the end) for comparison. A peak RSS ratio 10k/1k near
1.0 means memory does not grow with the number of images.

    python benchmarks/predict_memory.py
    python benchmarks/predict_memory.py --sizes 1000 10000 --modes stream
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt, print_header, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
model:
  class_path: tl_lightning.modules.finetune.FineTuneModule
  init_args:
    backbone: {backbone}
    weights: null
data:
  class_path: tl_lightning.data.DigitsDataModule
  init_args:
    image_size: 32
    batch_size: 64
    num_workers: 0
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_progress_bar: false
"""

# Runs one command as its only child and prints that child's peak RSS in KiB (Linux ru_maxrss).
WRAPPER = (
    "import resource, subprocess, sys; "
    "rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(rc)"
)


def make_images(folder: Path, n: int, size: int = 32, seed: int = 0) -> None:
    """``n`` random-colour JPEGs of ``size`` px (noise, so each one really decodes)."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in tqdm(range(n), desc=f"writing {n} JPEGs", unit="img", leave=False):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.jpg", quality=90)


def run_predict(config: Path, images: Path, output: Path, keep: bool, threads: int) -> dict:
    """Run one predict child; return its peak RSS (MiB), wall time and CSV row count."""
    cmd = [
        sys.executable,
        "-m",
        "tl_lightning",
        "predict",
        "--config",
        str(config),
        f"--data.init_args.predict_dir={images}",
        f"--prediction_writer.output={output}",
    ]
    if keep:
        cmd.append("--return_predictions=true")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"predict failed:\n{done.stderr[-3000:]}")
    peak_kb = int(done.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    with open(output, newline="") as f:
        rows = sum(1 for _ in csv.reader(f)) - 1
    return {"peak_mib": peak_kb / 1024, "wall": wall, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 10000])
    parser.add_argument(
        "--modes", nargs="+", default=["stream", "keep"], choices=["stream", "keep"]
    )
    parser.add_argument("--backbone", default="conv4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    print_header("predict memory: peak RSS vs number of images")
    small, large = args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = tmp / "predict.yaml"
        config.write_text(CONFIG.format(backbone=args.backbone))
        make_images(tmp / "large", large)
        (tmp / "small").mkdir()
        for i in range(small):  # the small folder is a prefix of the large one
            name = f"img{i:05d}.jpg"
            os.link(tmp / "large" / name, tmp / "small" / name)

        results = {}
        for mode in args.modes:
            for n, folder in ((small, "small"), (large, "large")):
                out = tmp / f"{mode}-{n}.csv"
                results[mode, n] = run_predict(
                    config, tmp / folder, out, mode == "keep", args.threads
                )

    rows = []
    for mode in args.modes:
        a, b = results[mode, small], results[mode, large]
        marginal = (large - small) / max(b["wall"] - a["wall"], 1e-9)
        for n, r in ((small, a), (large, b)):
            rows.append([mode, n, r["rows"], fmt(r["peak_mib"], 1), fmt(r["wall"], 1), "", ""])
        rows[-1][5] = fmt(b["peak_mib"] / a["peak_mib"], 3)
        rows[-1][6] = fmt(marginal, 0)
    print_table(
        [
            "mode",
            "images",
            "CSV rows",
            "peak RSS (MiB)",
            "wall (s)",
            f"peak ratio {large}/{small}",
            "images/s (marginal)",
        ],
        rows,
    )
    print(
        f"\nbackbone {args.backbone} (random init), 32 px JPEGs, batch 64, 0 workers, "
        f"{args.threads} torch thread(s); wall includes ~interpreter start-up and imports."
    )


if __name__ == "__main__":
    main()
