"""Checks that stop a bad model/data pairing before training, with messages that name the fix.

- :func:`check_model_matches_data`: a model's classes (count and order) equal the data's.
- :func:`check_input_size`: the backbone can take the configured image size.
- :func:`check_backbone_config`: the config names a known backbone and weights tag.

CLI parse errors live in :mod:`tl_lightning.cli_errors`, ``--ckpt_path`` checks in
:mod:`tl_lightning.checkpoint_safety`.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn


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
    if getattr(backbone, "probed_size", None) == image_size:
        return  # the backbone's own probe ran a forward pass at this size when it was built
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
