"""Shared benchmark helpers: machine description, load, timer, markdown tables, quiet Lightning."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from lightning.pytorch.plugins.precision import MixedPrecision


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags that decide CPU speed here: AVX2, AVX-512 (F, BF16), AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def load_avg() -> str:
    """1/5/15-minute load average (other processes share these cores)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line() -> str:
    """One line naming the machine: CPU, cores, SIMD flags, torch version, threads, load."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    flags = ",".join(cpu_flags()) or "none"
    return (
        f"CPU: {cpu_model()} | cores: {os.cpu_count()} | torch threads: {torch.get_num_threads()} "
        f"| SIMD: {flags} | {gpu} | torch {torch.__version__} | python {platform.python_version()} "
        f"| load avg (1/5/15 min): {load_avg()}"
    )


def add_threads_arg(parser) -> None:
    """``--threads N``: torch intra-op threads (default: auto, see :func:`apply_threads`)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores, or 1 when the load average exceeds the cores)",
    )


def apply_threads(threads: int | None) -> int:
    """Set torch's thread count; auto picks 1 on an oversubscribed machine.

    With more runnable processes than cores, OpenMP threads of one process wait for each other
    at every barrier while the other is descheduled: measured here, 1 thread ran an
    EfficientNet-Lite0 forward 3-4x faster than 2 threads at load average 16 on 2 cores.
    """
    if threads is None:
        cores = os.cpu_count() or 1
        threads = 1 if os.getloadavg()[0] > cores else cores
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for subprocesses
    return threads


def print_header(title: str) -> None:
    """The benchmark title, machine line and the exact command that produced the output."""
    print(f"## {title}\n")
    print(f"- machine: {machine_line()}")
    print(f"- command: `python {shlex.join(sys.argv)}`\n", flush=True)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table; floats are formatted by the caller (strings pass through)."""
    cells = [[str(c) for c in row] for row in rows]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in cells:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


@contextmanager
def timer() -> Iterator[dict]:
    """``with timer() as t: ...`` then ``t["s"]`` holds the elapsed wall-clock seconds."""
    out: dict = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def quiet_lightning() -> None:
    """Silence Lightning's info banners and known-harmless warnings so tables stay readable."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "tl_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*in eval mode.*")


def bare_trainer_kwargs() -> dict:
    """Trainer options that remove everything but the loop (fair against hand-written PyTorch)."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def mean_std(xs: Sequence[float], digits: int = 3) -> str:
    """``"mean +- sample std"`` (std 0 for a single value)."""
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} +- {std:.{digits}f}"


def forward_context(precision: str):
    """The autocast ``Trainer(precision=...)`` wraps a CPU forward in, for hand-written loops."""
    if precision == "bf16-mixed":
        return MixedPrecision("bf16-mixed", "cpu").forward_context()
    return contextlib.nullcontext()
