"""Any timm model as a Backbone: pretrained tags, ``pretrained_cfg`` preprocessing, timm's groups."""

from __future__ import annotations

import os
from functools import cache

from torch import nn

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.backbones.intermediate import cut_at
from tl_lightning.backbones.registry import BackboneSpec
from tl_lightning.backbones.weights import load_into, load_state_dict_file, looks_like_path
from tl_lightning.errors import WeightsUnavailableError, did_you_mean


@cache
def list_names() -> list[str]:
    import timm

    return timm.list_models()


def is_model(arch: str) -> bool:
    import timm

    return timm.is_model(arch)


def spec(arch: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"timm/{arch}",
        build=lambda weights, layer: build(arch, weights, layer),
        data_config=lambda weights: data_config(_model_name(arch, weights)),
        description=f"timm {arch}",
    )


def _model_name(arch: str, weights: str | None) -> str:
    """``arch.tag`` for a pretrained tag; the bare arch (default tag) for DEFAULT, None or a path."""
    if weights is None or weights == "DEFAULT" or looks_like_path(weights) or "." in arch:
        return arch
    import timm

    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if weights not in tags:
        hint = did_you_mean(weights, tags, n=1)
        raise ValueError(
            f"unknown weights tag '{weights}' for timm/{arch}; {hint}valid: ['DEFAULT', *{tags}], null, or a file path"
        )
    return f"{arch}.{weights}"


def data_config(model_name: str) -> DataConfig:
    import timm
    from timm.data import resolve_data_config

    cfg = timm.models.get_pretrained_cfg(model_name)
    resolved = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})
    return DataConfig(
        mean=tuple(resolved["mean"]),
        std=tuple(resolved["std"]),
        input_size=int(resolved["input_size"][-1]),
        interpolation=resolved["interpolation"],
        crop_pct=float(resolved["crop_pct"]),
        fixed_input_size=bool(getattr(cfg, "fixed_input_size", False)),
    )


def create(arch: str, weights: str | None) -> nn.Module:
    """The timm model without classifier (``num_classes=0``: pooled pre-logits features)."""
    import timm

    name = _model_name(arch, weights)
    pretrained = weights is not None and not looks_like_path(weights)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except Exception as e:
        if not pretrained:
            raise
        offline = os.environ.get("HF_HUB_OFFLINE")
        raise WeightsUnavailableError(
            f"could not fetch timm weights for '{name}' ({type(e).__name__}: {e}){' [HF_HUB_OFFLINE set]' if offline else ''}. "
            f"Offline? Use weights: null, a local file, or the offline backbone 'efficientnet_lite0'."
        ) from e
    if looks_like_path(weights):
        load_into(model, load_state_dict_file(weights), str(weights))
    return model


def wrap(model: nn.Module, name: str, data_cfg: DataConfig, layer: str | None) -> Backbone:
    """Backbone around a timm model; ``layer`` cuts it at an intermediate FX node."""
    spec_ = group_spec(model)
    body: nn.Module = model
    if layer is not None:
        from timm.models import create_feature_extractor

        body = cut_at(model, layer, name, create_feature_extractor)
    return Backbone(body, data_cfg, spec_, name=name)


def build(arch: str, weights: str | None, layer: str | None) -> Backbone:
    model = create(arch, weights)
    return wrap(model, f"timm/{arch}", data_config(_model_name(arch, weights)), layer)


def group_spec(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Stage-level groups following timm's ``group_matcher`` order: ``stem``, stages, ``neck``.

    timm's matcher gives one group per block and folds the last block into the head; we name
    each parameter by its stage container (``blocks.1``, ``layer3``, ``stages.2``), everything
    before the first stage is ``stem`` and everything after the last is ``neck``.
    """
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return [(n, [n]) for n, c in model.named_children() if any(True for _ in c.parameters())]
    ordered = [n for names in group_parameters(model, model.group_matcher(coarse=False)).values() for n in names]
    groups: list[tuple[str, list[str]]] = []
    seen_stage = False
    for name in ordered:
        stage = _stage_of(model, name)
        seen_stage = seen_stage or stage is not None
        label = stage or ("neck" if seen_stage else "stem")
        if groups and groups[-1][0] == label:
            groups[-1][1].append(name)
        else:
            groups.append((label, [name]))
    return groups


def _stage_of(model: nn.Module, param_name: str) -> str | None:
    """The first numbered container on the parameter's path (``blocks.1.0.conv.w`` -> ``blocks.1``)."""
    parts = param_name.split(".")[:-1]
    for j, part in enumerate(parts):
        if any(c.isdigit() for c in part):
            prefix = ".".join(parts[: j + 1])
            if any(any(True for _ in c.parameters()) for c in model.get_submodule(prefix).children()):
                return prefix
    return None
