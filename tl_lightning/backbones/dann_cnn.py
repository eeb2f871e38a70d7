"""The small digits CNN of the DANN paper (Ganin et al. 2016, MNIST -> MNIST-M), trained from scratch.

Feature extractor: conv5x5-32, ReLU, max-pool 2, conv5x5-48, ReLU, max-pool 2, flatten (768 values
at 28 px). The paper's label predictor (FC 100-100-10) and domain classifier (FC 100-1) are heads
on top: ``DANNModule(head_hidden_dims=[100, 100], domain_hidden_dims=[100])``.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.backbones.registry import register_backbone
from tl_lightning.backbones.weights import load_into, load_state_dict_file, looks_like_path

INPUT_SIZE = 28  # the paper's MNIST size; 32 px works too (the 5x5 map is pooled to 4x4)


def data_config(weights: str | None = None) -> DataConfig:
    """From-scratch network: inputs scaled to [-1, 1], 28 px, no resize crop."""
    return DataConfig(
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=INPUT_SIZE, crop_pct=1.0
    )


def dann_cnn_body() -> nn.Sequential:
    """The conv feature extractor, flattening to ``48 * 4 * 4 = 768`` features at any input >= 16 px."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 32, kernel_size=5),
            relu1=nn.ReLU(inplace=True),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 48, kernel_size=5),
            relu2=nn.ReLU(inplace=True),
            pool2=nn.MaxPool2d(2),
            # identity at 28 px (the paper's net); keeps the feature size fixed at other sizes
            resize=nn.AdaptiveAvgPool2d(4),
            flatten=nn.Flatten(),
        )
    )


@register_backbone(
    "dann_cnn",
    data_config=data_config,
    description="DANN paper's digits CNN (conv32-conv48, 768-d features), random init: train from scratch",
)
def build(weights: str | None = None, layer: str | None = None) -> Backbone:
    """``weights``: ``None`` (random init, the intended use) or a local weights file."""
    if layer is not None:
        raise ValueError(
            f"dann_cnn has no intermediate layers to cut at (got layer='{layer}'); use layer: null"
        )
    body = dann_cnn_body()
    if weights is not None and looks_like_path(weights):
        load_into(body, load_state_dict_file(weights), weights)
    elif weights is not None:
        raise ValueError(
            f"dann_cnn has no pretrained weights '{weights}'; it trains from scratch: "
            "use weights: null (or a path to a weights file you saved)"
        )
    return Backbone(
        body, data_config(weights), [("conv1", ["conv1"]), ("conv2", ["conv2"])], name="dann_cnn"
    )
