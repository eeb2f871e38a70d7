"""Checks that stop a bad configuration before training, with messages that name the key and fix.

- :class:`ConfigErrorParser`: the CLI parser; it puts a one-line diagnosis with the closest valid
  names ("unknown option 'head_dropuot' for FeatureExtractionModule; did you mean 'head_dropout'?")
  on top of jsonargparse's error.
- :func:`check_model_matches_data`: a model's classes (count and order) equal the data's.
- :func:`check_checkpoint`: a ``--ckpt_path`` checkpoint loads safely and was trained on the
  same classes as the configured data.
- :func:`check_input_size`: the backbone can take the configured image size.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from tl_lightning.errors import UnsafeFileError

_UNKNOWN_OPTION = re.compile(r"Option '([\w.]+)' is not accepted")
_UNKNOWN_TOP = re.compile(r"does not accept option '([\w.]+)'")
_CLASS_PATH = re.compile(r"class_path[ =]'([\w.]+)'")
_WRONG_TYPE = re.compile(r'Parser key "([\w.]+)":\s*Expected a <class \'(\w+)\'>\. Got value: (.*)')
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


def init_parameters(class_path: str) -> list[str]:
    """Constructor argument names of ``class_path`` (following ``**kwargs`` up the MRO)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [
            p.name
            for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def explain_parse_error(message: str, top_level_keys: list[str] | None = None) -> str:
    """One line per recognised mistake in a jsonargparse error, with the closest valid names."""
    hints = []
    class_paths = list(dict.fromkeys(_CLASS_PATH.findall(message)))
    for option in dict.fromkeys(_UNKNOWN_OPTION.findall(message)):
        owners = [(cp, init_parameters(cp)) for cp in class_paths]
        owners = [(cp, ps) for cp, ps in owners if ps and option not in ps]
        best = max(
            owners,
            key=lambda o: max(
                (difflib.SequenceMatcher(None, option, p).ratio() for p in o[1]), default=0
            ),
            default=None,
        )
        if best is None:
            hints.append(f"unknown option '{option}'; remove it or fix its spelling")
            continue
        cp, params = best
        hints.append(
            f"unknown option '{option}' for {cp}; {_did_you_mean(option, params)}"
            f"valid options: {', '.join(params)}"
        )
    for key in dict.fromkeys(_UNKNOWN_TOP.findall(message)):
        head = key.split(".")[0]
        choices = top_level_keys or []
        hints.append(
            f"unknown key '{head}'; {_did_you_mean(head, choices)}"
            + (f"valid top-level keys: {', '.join(choices)}" if choices else "")
        )
    for key, typ, value in _WRONG_TYPE.findall(message):
        hints.append(f"'{key}' must be {typ}, got {value.strip()!r}; fix the value in your config")
    for module_name, attr in _NO_ATTRIBUTE.findall(message):
        try:
            names = [n for n in dir(importlib.import_module(module_name)) if not n.startswith("_")]
        except ImportError:
            names = []
        hints.append(f"no class '{attr}' in {module_name}; {_did_you_mean(attr, names)}".rstrip())
    return "\n".join(hints)


class ConfigErrorParser(LightningArgumentParser):
    """The CLI's argument parser: puts a diagnosis naming the bad key and the fix on top of errors."""

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        keys = sorted(
            {a.dest.split(".")[0] for a in parser._actions if a.dest not in ("help", "config")}
        )
        # nested class parsers raise (exit_on_error off) into the top one: diagnose only there
        hint = explain_parse_error(message, keys) if self.exit_on_error else ""
        if hint:
            message = f"{hint}\n(details below; `--help` lists every key)\n{message}"
        return super().error(message, ex)


def check_model_matches_data(
    model: Any, num_classes: int, class_names: list[str], data: str
) -> None:
    """Raise ``ValueError`` when the model's classes (count, then order) differ from the data's."""
    hparams = getattr(model, "hparams", {}) or {}
    model_n = hparams.get("num_classes")
    if model_n is None:
        return
    model_names = hparams.get("class_names")
    names = f" {list(model_names)}" if model_names else ""
    if model_n != num_classes:
        raise ValueError(
            f"num_classes mismatch: the model predicts {model_n} classes{names} but {data} has "
            f"{num_classes} {list(class_names)}; use a checkpoint trained on this data, or train a "
            f"new head (fit without --ckpt_path; the CLI sets num_classes from the data)"
        )
    if model_names:
        _compare_class_names(list(model_names), list(class_names), "the model", data)


def _compare_class_names(trained: list[str], data: list[str], source: str, target: str) -> None:
    """Same names in another order (or partly other names): an error, labels would be wrong.

    Wholly different names (display names given to numbered classes, say) only warn.
    """
    if trained == data:
        return
    if set(trained) & set(data):
        raise ValueError(
            f"class_names mismatch: {source} was trained on {trained} but {target} has {data} "
            f"(same count, different names or order: every prediction would get the wrong "
            f"label); use data with the same classes in the same order"
        )
    rank_zero_warn(
        f"{source} names its classes {trained} and {target} {data}: assuming the same classes "
        f"in the same order under other names"
    )


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


def _forward_ok(backbone: nn.Module, size: int) -> Exception | None:
    param = next(backbone.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, size, size, device=device, dtype=dtype))
        if out.ndim != 2 or out.shape[1] == 0 or not torch.isfinite(out).all():
            return ValueError(f"features of shape {tuple(out.shape)}")
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        return e
    return None


def check_input_size(
    backbone: nn.Module, image_size: int, name: str, native: int | None = None
) -> None:
    """Raise ``ValueError`` before training when ``backbone`` cannot take ``image_size`` px images.

    A forward pass on one blank image in eval mode (cheap, no BN statistics change); on failure,
    the smallest of 2x, 4x, ... the size that works is suggested.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        error = _forward_ok(backbone, image_size)
        if error is None:
            return
        limit = max(native or 224, image_size)
        bigger = [image_size * 2**k for k in range(1, 8) if image_size * 2**k <= limit]
        works = next((s for s in bigger if _forward_ok(backbone, s) is None), None)
        fix = f"use image_size >= {works}" if works else "use the backbone's native size"
        raise ValueError(
            f"image_size={image_size} is too small or wrong for backbone '{name}' "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); {fix}"
            f"{f' (native size {native})' if native else ''}, or pick another backbone"
        )
    finally:
        backbone.train(was_training)


def check_backbone_config(config: Any) -> None:
    """``model.init_args.backbone``/``weights`` name a known backbone and weights tag (no build)."""
    from tl_lightning.backbones import resolve_data_config

    get = getattr(config, "get", None)
    backbone = get("model.init_args.backbone") if get else None
    if not isinstance(backbone, str):
        return
    weights = get("model.init_args.weights", "DEFAULT")
    try:
        resolve_data_config(backbone, weights)
    except ValueError as e:
        key = "weights" if "weights" in str(e).split(";")[0] else "backbone"
        raise ValueError(f"model.init_args.{key}: {e}") from None


def check_model_and_data(model: Any, datamodule: Any, stage: str | None = None) -> None:
    """Before the first step: the model's classes match the data's and its backbone takes the size.

    Called by the datamodule when it builds a loader, and meant for ``ClassifierModule.setup``
    (which runs before feature caching reads any image).
    """
    if datamodule is None:
        return
    names = getattr(datamodule, "class_names", None)
    if stage != "predict" and names is not None:  # predictions use the model's own classes
        check_model_matches_data(model, len(names), list(names), type(datamodule).__name__)
    backbone = getattr(model, "backbone", None)
    image_size = getattr(datamodule, "image_size", None)
    if isinstance(backbone, nn.Module) and isinstance(image_size, int):
        name = getattr(backbone, "name", None) or type(backbone).__name__
        native = getattr(getattr(datamodule, "data_config", None), "input_size", None)
        check_input_size(backbone, image_size, name, native)
