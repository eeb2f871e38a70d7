"""torchvision.transforms.v2 pipelines built from a backbone's DataConfig plus an augmentation preset."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from tl_lightning.backbones import DataConfig

AUGMENT_PRESETS = ("none", "basic", "strong")


def _interpolation(cfg: DataConfig) -> v2.InterpolationMode:
    return v2.InterpolationMode(cfg.interpolation)


def _normalize(cfg: DataConfig) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]


def eval_transform(cfg: DataConfig, image_size: int | None = None, resize: bool = True) -> v2.Compose:
    """Resize to ``size / crop_pct``, center-crop ``size``, normalise: the backbone's own eval recipe.

    ``resize=False`` is for data already at the right size (the digits are upsampled once).
    """
    size = image_size or cfg.input_size
    ops: list = [v2.ToImage()]
    if resize:
        ops += [
            v2.Resize(int(math.floor(size / cfg.crop_pct)), interpolation=_interpolation(cfg), antialias=True),
            v2.CenterCrop(size),
        ]
    return v2.Compose(ops + _normalize(cfg))


def train_transform(
    cfg: DataConfig,
    image_size: int | None = None,
    augment: str = "basic",
    hflip: bool = True,
    resize: bool = True,
) -> v2.Compose:
    """Training pipeline for a preset.

    - ``none``: the eval pipeline (deterministic, so frozen features can be cached);
    - ``basic``: RandomResizedCrop + horizontal flip;
    - ``strong``: ``basic`` + TrivialAugmentWide (colour, rotation, affine, ...) + RandomErasing.

    ``hflip=False`` for data where mirroring changes the label (digits, text).
    """
    if augment not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augment preset '{augment}'; valid: {list(AUGMENT_PRESETS)}")
    if augment == "none":
        return eval_transform(cfg, image_size, resize)
    size = image_size or cfg.input_size
    scale = (0.08, 1.0) if resize else (0.6, 1.0)  # pre-sized small images keep most of the object
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=_interpolation(cfg), antialias=True),
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if augment == "strong":
        ops.append(v2.TrivialAugmentWide(interpolation=_interpolation(cfg)))
    ops += _normalize(cfg)
    if augment == "strong":
        ops.append(v2.RandomErasing(p=0.25))
    return v2.Compose(ops)


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix applied to whole batches (targets become soft, the loss handles them)."""
    ops = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
