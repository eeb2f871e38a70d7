"""The offline ImageNet weights are really ImageNet weights: real photos get their real classes."""

from __future__ import annotations

import skimage.data as skimage_data  # a core dependency: the digits-M photos
import torch

from tl_lightning.backbones import build_backbone
from tl_lightning.backbones.efficientnet_lite0 import imagenet_state_dict, map_key
from tl_lightning.data.transforms import eval_transform

# ImageNet-1k indices
TABBY, TIGER_CAT, EGYPTIAN_CAT, ESPRESSO = 281, 282, 285, 967


def test_key_map_follows_stage_repeats():
    assert map_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert map_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert map_key("_blocks.3._bn0.weight") == "blocks.2.0.bn1.weight"
    assert map_key("_blocks.15._project_conv.weight") == "blocks.6.0.conv_pwl.weight"
    assert map_key("_bn1.running_mean") == "bn2.running_mean"


@torch.no_grad()
def test_chelsea_is_a_cat_and_coffee_an_espresso():
    bb = build_backbone("efficientnet_lite0").eval()
    state = imagenet_state_dict()
    weight, bias = state["classifier.weight"], state["classifier.bias"]
    tf = eval_transform(bb.data_config)
    photos = torch.stack(
        [
            tf(torch.from_numpy(getattr(skimage_data, n)()).permute(2, 0, 1))
            for n in ("chelsea", "coffee")
        ]
    )
    top = (bb(photos) @ weight.T + bias).argmax(dim=1).tolist()
    assert top[0] in (TABBY, TIGER_CAT, EGYPTIAN_CAT)
    assert top[1] == ESPRESSO
