"""The Conv-4 encoder of Prototypical Networks (Snell et al. 2017), registered as backbone ``conv4``.

Four blocks of conv3x3 (64 filters), BatchNorm, ReLU and 2x2 max-pooling. At 28 px (Omniglot)
the output is 64 x 1 x 1, exactly the paper's 64-d embedding. At larger inputs the Backbone
contract global-average-pools the last map (84 px: 64 x 5 x 5 -> 64-d), whereas the paper
flattens it to 1600-d; pooling keeps ``feature_dim`` independent of the image size.
There are no pretrained weights: ``DEFAULT``/``None`` mean random init (the paper trains it
from scratch); a local weights file loads like any other backbone's.
"""

from __future__ import annotations

from torch import nn

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.backbones.registry import register_backbone
from tl_lightning.backbones.weights import load_into, load_state_dict_file, looks_like_path

HIDDEN = 64


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3 -> BatchNorm -> ReLU -> max-pool 2: one block of the paper's encoder."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def conv4_body(in_channels: int = 3, hidden: int = HIDDEN) -> nn.Sequential:
    """The four blocks as one ``nn.Sequential`` (children ``0..3``)."""
    return nn.Sequential(*(conv_block(in_channels if i == 0 else hidden, hidden) for i in range(4)))


def data_config(weights: str | None = "DEFAULT") -> DataConfig:
    # Trained from scratch, so any sane normalisation works; 84 px is the miniImageNet size.
    return DataConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=84, crop_pct=1.0)


@register_backbone(
    "conv4",
    data_config=data_config,
    description="Conv-4 of Prototypical Networks (4 x conv3x3-64/BN/ReLU/maxpool), random init",
)
def build(weights: str | None = "DEFAULT", layer: str | None = None) -> Backbone:
    """``weights``: ``DEFAULT``/``None`` (random init) or a local weights file."""
    if layer is not None:
        raise ValueError(
            f"conv4 has no intermediate layer option (got layer='{layer}'); use layer: null"
        )
    body = conv4_body()
    if weights is not None and weights != "DEFAULT":
        if not looks_like_path(weights):
            raise ValueError(
                f"unknown weights '{weights}' for conv4; valid: DEFAULT or null (random init), or a file path"
            )
        load_into(body, load_state_dict_file(weights), weights)
    groups = [(f"block{i + 1}", [str(i)]) for i in range(4)]
    backbone = Backbone(body, data_config(weights), groups, name="conv4")
    backbone.pretrained = weights is not None and weights != "DEFAULT"
    return backbone
