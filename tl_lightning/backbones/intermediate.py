"""Features from an intermediate layer (the seeds' forward-hook extractor, done with torch.fx)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tl_lightning.errors import did_you_mean


def cut_at(model: nn.Module, layer: str, name: str, create: Callable | None = None) -> nn.Module:
    """A module returning ``{"features": output of layer}``; ``layer`` is an FX node or module name.

    A module name (``layer3``) means the module's last node, as in torchvision's
    ``create_feature_extractor``; ``create`` lets timm pass its own FX-aware version.
    """
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    nodes = get_graph_node_names(model)[1]
    if layer not in nodes and not any(n.startswith(layer + ".") for n in nodes):
        modules = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"layer '{layer}' not in {name}; {did_you_mean(layer, modules + nodes)}"
            "(any module name or torchvision get_graph_node_names(model) node works)"
        )
    return (create or create_feature_extractor)(model, return_nodes={layer: "features"})
