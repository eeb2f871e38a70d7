"""Mixed precision chosen by the hardware: ``precision: mixed`` picks bf16, fp16 or fp32 per device."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch import Trainer

log = logging.getLogger(__name__)

MIXED = "mixed"
# CPU flags of native bf16 matmuls; without them (AVX2 only) bf16 autocast is 3-16x slower than fp32
_FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 math (AMX or AVX-512 BF16), where bf16-mixed beats fp32."""
    return any(flag in cpu_flags() for flag in _FAST_BF16_CPU_FLAGS)


def mixed_precision_for(device: str | torch.device) -> str:
    """The fastest safe Lightning precision for ``device``.

    CUDA: ``bf16-mixed`` where the GPU computes bf16 (Ampere and newer), else ``16-mixed`` (fp16
    with loss scaling). CPU: ``bf16-mixed`` with AMX / AVX-512 BF16, else ``32-true``. Any other
    device: ``32-true``.

    Example:
        >>> mixed_precision_for("cpu") in ("bf16-mixed", "32-true")
        True
    """
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    if kind == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if kind == "cpu":
        return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
    return "32-true"


def _device_of(accelerator: object) -> str:
    """The device kind a Trainer ``accelerator`` argument (a name or an Accelerator) runs on."""
    if accelerator is not None and not isinstance(accelerator, str):  # e.g. CUDAAccelerator()
        name = type(accelerator).__name__.lower().removesuffix("accelerator")
    else:
        name = (accelerator or "auto").lower()
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def resolve_precision(precision: object, accelerator: object = "auto") -> object:
    """``precision`` unchanged, except ``"mixed"`` becomes :func:`mixed_precision_for` the accelerator."""
    if precision != MIXED:
        return precision
    device = _device_of(accelerator)
    chosen = mixed_precision_for(device)
    log.info("precision: mixed -> %s on %s", chosen, device)
    return chosen


class TLTrainer(Trainer):
    """Lightning's Trainer that also takes ``precision="mixed"`` (resolved by the hardware).

    Lightning has no automatic precision; ``mixed`` picks ``bf16-mixed``, ``16-mixed`` or
    ``32-true`` with :func:`mixed_precision_for` on the accelerator's device. Every other
    argument is Lightning's. ``tl-lightning`` uses this class, so configs may say ``precision: mixed``.
    ``sync_batchnorm=True`` on CPU is refused up front (PyTorch's SyncBatchNorm is GPU-only).

    The ``limit_*_batches`` arguments are annotated int-first: Lightning 2.6's signature reads
    ``Union[float, int, None]`` at runtime (typing's cache), so the CLI parsed ``5`` as ``5.0``,
    a fraction, and ``limit_train_batches: 1`` ran the whole epoch instead of one batch.

    Example:
        >>> trainer = TLTrainer(accelerator="cpu", precision="mixed", logger=False)
        >>> trainer.precision in ("bf16-mixed", "32-true")
        True
    """

    def __init__(
        self,
        *args,
        precision: _PRECISION_INPUT | Literal["mixed"] | None = None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs,
    ):
        accelerator = kwargs.get("accelerator", "auto")
        if kwargs.get("sync_batchnorm") and _device_of(accelerator) == "cpu":
            # PyTorch's SyncBatchNorm has no CPU path; fail now, not at the first training step
            raise ValueError(
                f"sync_batchnorm=True needs GPUs (accelerator={accelerator!r} runs on CPU, where "
                "PyTorch's SyncBatchNorm cannot run); set trainer.sync_batchnorm: false"
            )
        precision = resolve_precision(precision, accelerator)
        super().__init__(
            *args,
            precision=precision,
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )
