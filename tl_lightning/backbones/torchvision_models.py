"""torchvision classification models as Backbones: weights enums, preprocessing, layer groups."""

from __future__ import annotations

from functools import cache

from torch import nn

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.backbones.intermediate import cut_at
from tl_lightning.backbones.registry import BackboneSpec
from tl_lightning.backbones.weights import load_into, load_state_dict_file, looks_like_path
from tl_lightning.errors import WeightsUnavailableError, did_you_mean

GroupSpec = list[tuple[str, list[str]]]


@cache
def available() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def spec(arch: str) -> BackboneSpec:
    return BackboneSpec(
        name=f"torchvision/{arch}",
        build=lambda weights, layer: build(arch, weights, layer),
        data_config=lambda weights: data_config(arch, weights),
        description=f"torchvision {arch}",
    )


def _weights_enum(arch: str, weights: str | None):
    """The torchvision weights enum member for ``weights`` (None, a path -> the default's config)."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(arch)
    if weights is None or looks_like_path(weights):
        return None
    try:
        return enum.verify(weights)
    except (KeyError, ValueError):
        names = list(dict.fromkeys(["DEFAULT", *enum.__members__]))
        hint = did_you_mean(weights, names, n=1)
        raise ValueError(
            f"unknown weights '{weights}' for torchvision/{arch}; {hint}valid: {names}, null, or a file path"
        ) from None


def data_config(arch: str, weights: str | None) -> DataConfig:
    import torchvision.models as tvm

    member = _weights_enum(arch, weights) or tvm.get_model_weights(arch).DEFAULT
    t = member.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return DataConfig(
        mean=tuple(t.mean),
        std=tuple(t.std),
        input_size=crop,
        interpolation=t.interpolation.value,
        crop_pct=crop / resize,
        fixed_input_size=arch.startswith(("vit_", "maxvit")),
    )


def build(arch: str, weights: str | None, layer: str | None) -> Backbone:
    import torchvision.models as tvm

    member = _weights_enum(arch, weights)
    try:
        model = tvm.get_model(arch, weights=member)
    except Exception as e:  # download failure: offline, proxy, corrupt cache
        raise WeightsUnavailableError(
            f"could not fetch torchvision weights {member} for '{arch}' ({e}). Offline? "
            f"Use weights: null, a local file, or the offline backbone 'efficientnet_lite0'."
        ) from e
    _drop_classifier(model, arch)
    if looks_like_path(weights):
        load_into(model, load_state_dict_file(weights), str(weights))
    body: nn.Module = model
    if layer is not None:
        body = cut_at(model, layer, arch)
    return Backbone(
        body, data_config(arch, weights), group_spec(model, arch), name=f"torchvision/{arch}"
    )


def _drop_classifier(model: nn.Module, arch: str) -> None:
    """Replace the final Linear (the ImageNet classifier) by Identity, keeping pre-logits features."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            f"torchvision/{arch} has no Linear classifier to remove; use it through timm"
        )
    parent_name, _, child = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


def group_spec(model: nn.Module, arch: str) -> GroupSpec:
    """Ordered layer groups, input side first, for the torchvision families."""
    if arch.startswith(("resnet", "resnext", "wide_resnet")):
        return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]
    if arch.startswith("vgg"):
        groups, block, current = [], 1, []
        for idx, mod in model.features.named_children():
            current.append(f"features.{idx}")
            if isinstance(mod, nn.MaxPool2d):
                groups.append((f"block{block}", current))
                block, current = block + 1, []
        linears = [
            f"classifier.{i}"
            for i, m in model.classifier.named_children()
            if isinstance(m, nn.Linear)
        ]
        return groups + [(f"fc{6 + i}", [n]) for i, n in enumerate(linears)]
    if arch.startswith("densenet"):
        stem = ("stem", ["features.conv0", "features.norm0"])
        blocks = [
            (f"block{i}", [f"features.denseblock{i}", f"features.transition{i}"])
            for i in range(1, 4)
        ]
        return [stem, *blocks, ("block4", ["features.denseblock4", "features.norm5"])]
    if arch.startswith("vit_"):
        n = len(model.encoder.layers)
        return (
            [("embed", ["conv_proj", "class_token", "encoder.pos_embedding"])]
            + [(f"block{i}", [f"encoder.layers.encoder_layer_{i}"]) for i in range(n)]
            + [("norm", ["encoder.ln"])]
        )
    return _generic_spec(model)


def _generic_spec(model: nn.Module) -> GroupSpec:
    """Top-level children in order; a long ``features`` Sequential is split into its children.

    Covers efficientnet_*, mobilenet_*, convnext_*, regnet_* and most others: ``features.0`` is
    the stem, the last feature child the head convolution, and a trailing ``classifier`` Linear
    (mobilenet_v3's pre-logits layer) its own group.
    """
    groups: GroupSpec = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        kids = [k for k, m in child.named_children() if any(True for _ in m.parameters())]
        if (
            isinstance(child, nn.Sequential)
            and len(kids) >= 3
            and name in ("features", "trunk_output")
        ):
            for i, k in enumerate(kids):
                label = "stem" if i == 0 else ("head_conv" if i == len(kids) - 1 else f"stage{i}")
                groups.append((label, [f"{name}.{k}"]))
        else:
            groups.append((name, [name]))
    return groups
