"""Checkpoint loading safety: a ``--ckpt_path`` file is read without running code, then vetted.

- :func:`load_checkpoint_safely`: ``torch.load(weights_only=True)``; code-carrying pickles are
  refused with :class:`~tl_lightning.errors.UnsafeFileError`, never executed.
- :func:`check_lightning_checkpoint`: the file is a checkpoint a tl-lightning run wrote (a
  bare ``state_dict`` or another program's file is named for what it lacks).
- :func:`check_checkpoint`: the checkpoint was trained on the same classes as the configured data.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from tl_lightning.config_checks import _compare_class_names
from tl_lightning.errors import UnsafeFileError

_SPECIAL_CKPT = ("last", "best", "hpc", "registry")


def load_checkpoint_safely(ckpt_path: str | Path | None, weights_only: bool | None = True) -> Any:
    """The checkpoint at ``ckpt_path`` read with ``weights_only=True`` (None for 'last', 'best'...).

    Raises ``FileNotFoundError`` for a missing file and :class:`UnsafeFileError` for one holding
    pickled code (it is never executed). ``weights_only=False`` (the user's explicit opt-in for a
    trusted file) skips the read.
    """
    if ckpt_path is None or str(ckpt_path).split(":")[0] in _SPECIAL_CKPT:
        return None
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"--ckpt_path '{ckpt_path}' does not exist; give a .ckpt file (e.g. "
            f"runs/<name>/version_0/checkpoints/last.ckpt) or 'last' to resume the latest run"
        )
    if weights_only is False:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        raise UnsafeFileError(
            f"refusing to load checkpoint '{path}': it holds pickled objects that could run code "
            f"({detail[-1] if detail else type(e).__name__}); only load checkpoints you trust, "
            f"and only with --weights_only=false if you wrote them yourself"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint '{path}' is corrupt or not a checkpoint ({e})") from e


# What every checkpoint a tl-lightning run (CLI or Trainer) writes holds, and why it is needed.
CHECKPOINT_KEYS = {
    "state_dict": "the model weights",
    "pytorch-lightning_version": "the Lightning version that wrote it",
    "hyper_parameters": "the model's constructor arguments (to rebuild it)",
}


def check_lightning_checkpoint(ckpt: Any, ckpt_path: str | Path) -> None:
    """Raise ``ValueError`` naming what ``ckpt`` lacks when a tl-lightning run did not write it.

    Example:
        >>> check_lightning_checkpoint({"w": 1}, "model.pt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: checkpoint 'model.pt' was not written by tl-lightning: it lacks 'state_dict' ...
    """
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"checkpoint '{ckpt_path}' was not written by tl-lightning: it holds a "
            f"{type(ckpt).__name__}, not a checkpoint dict; give a .ckpt file from a run's "
            f"checkpoints/ folder, or load bare weights with --model.init_args.weights {ckpt_path}"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if not missing:
        return
    lacks = ", ".join(f"'{key}' ({CHECKPOINT_KEYS[key]})" for key in missing)
    bare = (
        " (it looks like a bare state_dict)"
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values())
        else ""
    )
    raise ValueError(
        f"checkpoint '{ckpt_path}' was not written by tl-lightning: it lacks {lacks}{bare}; "
        f"give a .ckpt file from a run's checkpoints/ folder (e.g. runs/<name>/version_0/"
        f"checkpoints/last.ckpt), or load bare weights with --model.init_args.weights {ckpt_path}"
    )


def check_checkpoint(
    ckpt_path: str | Path | None,
    model: Any,
    datamodule: Any = None,
    weights_only: bool | None = True,
) -> None:
    """Before ``--ckpt_path`` is restored: refuse code-carrying pickles and mismatched classes."""
    ckpt = load_checkpoint_safely(ckpt_path, weights_only)
    if ckpt is None:
        return
    path = Path(ckpt_path)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    ckpt_n = hparams.get("num_classes")
    model_n = getattr(model, "hparams", {}).get("num_classes")
    if ckpt_n is None or model_n is None:
        return
    ckpt_names = hparams.get("class_names")
    data_names = list(
        getattr(datamodule, "class_names", None) or model.hparams.get("class_names") or []
    )
    source = f"checkpoint '{path}'"
    if ckpt_n != model_n:
        raise ValueError(
            f"num_classes mismatch: {source} predicts {ckpt_n} classes"
            f"{f' {list(ckpt_names)}' if ckpt_names else ''} but the data has {model_n} "
            f"{data_names}; use the data the checkpoint was trained on, or fit a new model "
            f"without --ckpt_path"
        )
    if ckpt_names and data_names:
        _compare_class_names(list(ckpt_names), data_names, source, "the data")

