"""Backbones: one contract (:class:`Backbone`) over torchvision, timm and our own networks."""

from tl_lightning.backbones import conv4, dann_cnn, efficientnet_lite0  # noqa: F401  (register themselves)
from tl_lightning.backbones.backbone import Backbone, BNPolicy, DataConfig, LayerGroup
from tl_lightning.backbones.registry import (
    build_backbone,
    list_backbones,
    register_backbone,
    resolve_data_config,
    skip_pretrained_weights,
)

__all__ = [
    "Backbone",
    "BNPolicy",
    "DataConfig",
    "LayerGroup",
    "build_backbone",
    "list_backbones",
    "register_backbone",
    "resolve_data_config",
    "skip_pretrained_weights",
]
