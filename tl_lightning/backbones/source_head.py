"""The classifier a backbone was pretrained with (its *source* head), kept to measure forgetting.

A backbone drops its pretraining classifier; fine-tuning then changes the features under it. Kept
frozen beside the backbone, that classifier tells how much of the source task (ImageNet) the
fine-tuned features still support: the agreement and accuracy in :mod:`tl_lightning.forgetting`,
and the teacher of LwF in :class:`~tl_lightning.modules.FineTuneModule`.
"""

from __future__ import annotations

import copy

from torch import nn

from tl_lightning.backbones.weights import looks_like_path
from tl_lightning.errors import WeightsUnavailableError


def source_classifier(name: str, weights: str | None = "DEFAULT", layer: str | None = None) -> nn.Linear | None:
    """The frozen pretraining classifier of backbone ``name`` with ``weights``, or None if it has none.

    None for random init (``weights: null``), local weight files, intermediate ``layer`` features
    (the classifier reads the final features only) and networks without a Linear classifier.

    Example:
        >>> head = source_classifier("efficientnet_lite0")     # ImageNet, offline
        >>> head.in_features, head.out_features
        (1280, 1000)
    """
    if weights is None or layer is not None or looks_like_path(weights):
        return None
    source, _, arch = name.partition("/") if "/" in name else ("", "", name)
    if name == "efficientnet_lite0":
        head = _lite0(weights)
    elif source in ("", "torchvision") and _is_torchvision(arch):
        head = _torchvision(arch, weights)
    elif source in ("", "timm"):
        head = _timm(arch, weights)
    else:
        return None
    if head is None:
        return None
    head = copy.deepcopy(head).float()
    head.requires_grad_(False)
    return head.eval()


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names in the order every ImageNet classifier here uses."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def _lite0(weights: str) -> nn.Linear:
    from tl_lightning.backbones.efficientnet_lite0 import imagenet_state_dict

    if weights not in ("DEFAULT", "IMAGENET1K"):
        raise ValueError(f"unknown weights '{weights}' for efficientnet_lite0; valid: DEFAULT, IMAGENET1K")
    state = imagenet_state_dict()
    w, b = state["classifier.weight"], state["classifier.bias"]
    head = nn.Linear(w.shape[1], w.shape[0])
    head.weight.data.copy_(w)
    head.bias.data.copy_(b)
    return head


def _is_torchvision(arch: str) -> bool:
    from tl_lightning.backbones import torchvision_models

    return arch in torchvision_models.available()


def _last_linear(model: nn.Module) -> nn.Linear | None:
    last = None
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            last = mod
    return last


def _torchvision(arch: str, weights: str) -> nn.Linear | None:
    import torchvision.models as tvm

    from tl_lightning.backbones.torchvision_models import _weights_enum

    member = _weights_enum(arch, weights)
    try:
        model = tvm.get_model(arch, weights=member)
    except Exception as e:  # the backbone itself was just built from the same files
        raise WeightsUnavailableError(f"could not fetch torchvision weights {member} for '{arch}' ({e})") from e
    return _last_linear(model)


def _timm(arch: str, weights: str) -> nn.Linear | None:
    import timm

    from tl_lightning.backbones.timm_models import _model_name

    try:
        model = timm.create_model(_model_name(arch, weights), pretrained=True)
    except Exception as e:
        raise WeightsUnavailableError(f"could not fetch timm weights for '{arch}' ({e})") from e
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head if isinstance(head, nn.Linear) else None
