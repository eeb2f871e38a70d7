"""Feature extraction: a frozen pretrained backbone ("ConvNet as fixed feature extractor") + a new head."""

from __future__ import annotations

import warnings

import torch

from tl_lightning.modules.base import ClassifierModule

# Lightning warns when modules are in eval mode at fit start; here that is the point.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class FeatureExtractionModule(ClassifierModule):
    """Train only a new head on a frozen backbone that stays in eval mode for the whole run.

    The backbone is frozen with the ``eval`` BatchNorm policy and kept in eval mode even when
    Lightning calls ``model.train()``, so its BN statistics never move (the seeds' loop called
    ``model.train()`` on the frozen network and lost 17 accuracy points on digits). It runs
    under ``no_grad``: no activations are kept for a backward pass that would not use them.

    Example:
        >>> model = FeatureExtractionModule(num_classes=10, backbone="efficientnet_lite0")
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])

    All arguments are those of :class:`~tl_lightning.modules.base.ClassifierModule`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone.freeze(bn="eval")
        self.backbone.eval()

    def train(self, mode: bool = True) -> FeatureExtractionModule:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: BN statistics must not move
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return super().features(x)

    def param_groups(self) -> list[dict]:
        return [{"name": "head", "params": list(self.head.parameters()), "lr_scale": 1.0}]
