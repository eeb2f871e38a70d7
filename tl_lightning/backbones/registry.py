"""One lookup for every backbone: ``build_backbone(name, weights, layer)``.

Names resolve in this order: our registered backbones (``efficientnet_lite0``, ...), then
``torchvision/<name>`` or a bare torchvision classification model, then ``timm/<name>`` or any
bare timm model. Registering works like torchvision's ``@register_model``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.errors import did_you_mean


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one registered backbone and what preprocessing it expects."""

    name: str
    build: Callable[[str | None, str | None], Backbone]  # (weights or None, layer) -> Backbone
    data_config: Callable[[str | None], DataConfig]  # weights -> preprocessing, without building
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}
_RESOLVED: dict[str, BackboneSpec] = {}  # name -> spec, filled by _resolve
_skip_weights = contextvars.ContextVar("tl_skip_pretrained_weights", default=False)


def register_backbone(
    name: str, data_config: Callable[[str | None], DataConfig], description: str = ""
) -> Callable:
    """Decorator registering ``fn(weights, layer) -> Backbone`` under ``name``.

    A name is registered once (like torchvision's ``register_model``): a second registration
    is a ``ValueError``, so a plugin can never silently replace a backbone.
    """

    def deco(fn: Callable[[str | None, str | None], Backbone]):
        if name in _REGISTRY:
            raise ValueError(
                f"backbone '{name}' is already registered (by {_REGISTRY[name].build.__module__}); "
                f"register yours under another name"
            )
        _REGISTRY[name] = BackboneSpec(name, fn, data_config, description)
        _RESOLVED.clear()  # a bare name may now mean the registered backbone
        return fn

    return deco


@contextlib.contextmanager
def skip_pretrained_weights() -> Iterator[None]:
    """Build architectures without fetching weights (a checkpoint is about to overwrite them)."""
    token = _skip_weights.set(True)
    try:
        yield
    finally:
        _skip_weights.reset(token)


def _resolve(name: str) -> BackboneSpec:
    """The spec of ``name``, looked up once per process (config checks, datamodule and module
    all ask for the same name in one run)."""
    spec = _RESOLVED.get(name)
    if spec is None:
        spec = _RESOLVED[name] = _lookup(name)
    return spec


def _lookup(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    from tl_lightning.backbones import timm_models, torchvision_models

    source, _, arch = name.partition("/") if "/" in name else ("", "", name)
    if source in ("", "torchvision") and arch in torchvision_models.available():
        return torchvision_models.spec(arch)
    if source in ("", "timm") and timm_models.is_model(arch):
        return timm_models.spec(arch)
    if source not in ("", "torchvision", "timm"):
        hint = did_you_mean(source, ["torchvision", "timm"])
        raise ValueError(
            f"unknown backbone source '{source}' in '{name}'; {hint}"
            f"use 'torchvision/<model>', 'timm/<model>' or a registered name (see `tl-lightning backbones`)"
        )
    if source:  # suggest with the same prefix: 'timm/resnt18' -> 'timm/resnet18'
        hint = did_you_mean(name, [f"{source}/{n}" for n in _source_names(source)])
    else:
        hint = did_you_mean(name, all_names())
    raise ValueError(
        f"unknown backbone '{name}'; {hint}(see `tl-lightning backbones`; any torchvision "
        f"classification model or timm model name works)"
    )


def _source_names(source: str) -> list[str]:
    from tl_lightning.backbones import timm_models, torchvision_models

    if source == "torchvision":
        return torchvision_models.available()
    return timm_models.list_names()


def build_backbone(
    name: str, weights: str | None = "DEFAULT", layer: str | None = None
) -> Backbone:
    """Build a :class:`Backbone` by name.

    Args:
        name: ``efficientnet_lite0``, ``resnet50``, ``torchvision/vit_b_16``, ``timm/convnext_tiny``...
        weights: a registry name (torchvision enum member such as ``IMAGENET1K_V2``, ``DEFAULT``,
            a timm pretrained tag), ``None`` for random init, or a local ``.safetensors``/``.pt`` file.
        layer: take pooled features from this intermediate node instead of the pre-logits output.

    Example:
        >>> bb = build_backbone("resnet18", weights=None)
        >>> bb.feature_dim, [g.name for g in bb.layer_groups()]
        (512, ['stem', 'layer1', 'layer2', 'layer3', 'layer4'])
    """
    spec = _resolve(name)
    if _skip_weights.get():
        # Keep the tag (it decides the preprocessing) but fetch nothing; the caller loads a checkpoint.
        backbone = spec.build(None, layer)
        backbone.data_config = spec.data_config(weights)
    else:
        backbone = spec.build(weights, layer)
    backbone.name = name
    # random init has no statistics worth keeping (BNPolicy.AUTO); the configured weights decide,
    # also when a checkpoint's weights replace them
    backbone.pretrained = backbone.pretrained and weights is not None
    return backbone


def resolve_data_config(name: str, weights: str | None = "DEFAULT") -> DataConfig:
    """The preprocessing of backbone ``name`` with ``weights``, without building the network."""
    return _resolve(name).data_config(weights)


@cache
def all_names() -> list[str]:
    from tl_lightning.backbones import timm_models, torchvision_models

    names = sorted(_REGISTRY) + torchvision_models.available() + timm_models.list_names()
    return list(dict.fromkeys(names))  # resnet50 is both a torchvision and a timm name


def list_backbones() -> dict[str, str]:
    """Registered backbones with their descriptions (torchvision and timm models come on top)."""
    return {name: spec.description for name, spec in sorted(_REGISTRY.items())}
