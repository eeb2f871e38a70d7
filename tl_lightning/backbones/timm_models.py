"""Any timm model as a Backbone: pretrained tags, ``pretrained_cfg`` preprocessing, timm's groups."""

from __future__ import annotations

import difflib
import os
from functools import cache

from torch import nn

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.backbones.registry import BackboneSpec
from tl_lightning.backbones.weights import load_into, load_state_dict_file, looks_like_path
from tl_lightning.errors import WeightsUnavailableError


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
        close = difflib.get_close_matches(weights, tags, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
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
        from torchvision.models.feature_extraction import get_graph_node_names

        nodes = get_graph_node_names(model)[1]
        if layer not in nodes:
            close = difflib.get_close_matches(layer, nodes, n=3)
            raise ValueError(f"layer '{layer}' not in {name}; did you mean {close}?")
        body = create_feature_extractor(model, return_nodes={layer: "features"})
    return Backbone(body, data_cfg, spec_, name=name)


def build(arch: str, weights: str | None, layer: str | None) -> Backbone:
    model = create(arch, weights)
    return wrap(model, f"timm/{arch}", data_config(_model_name(arch, weights)), layer)


def group_spec(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Groups from timm's own ``group_matcher`` (stem, stages/blocks, head), named by common prefix."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return [(n, [n]) for n, c in model.named_children() if any(True for _ in c.parameters())]
    grouped = group_parameters(model, model.group_matcher(coarse=True))
    groups = []
    for i, names in enumerate(grouped.values()):
        prefix = os.path.commonprefix([n.split(".") for n in names])
        digits = [j for j, part in enumerate(prefix) if part.isdigit()]
        prefix = prefix[: digits[0] + 1] if digits else prefix  # 'blocks.0.0' -> 'blocks.0'
        label = "stem" if i == 0 else (".".join(prefix) if prefix else f"group{i}")
        groups.append((label, list(names)))
    # The last group often shares no prefix (final conv + norm, e.g. conv_head|bn2).
    if len(groups) > 1 and groups[-1][0].startswith("group"):
        groups[-1] = ("head_conv", groups[-1][1])
    return groups
