"""Classification heads placed on top of a backbone's pooled features."""

from __future__ import annotations

from torch import nn

HEAD_KINDS = ("linear", "mlp")


def build_head(
    kind: str,
    in_features: int,
    num_classes: int,
    hidden_dim: int = 512,
    dropout: float = 0.0,
    hidden_dropout: float = 0.0,
) -> nn.Module:
    """``linear``: dropout -> Linear. ``mlp``: dropout -> Linear(hidden) -> ReLU -> dropout -> Linear.

    Example:
        >>> build_head("mlp", 1280, 10, hidden_dim=256, dropout=0.3)
    """
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))
    if kind == "mlp":
        return nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_features, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(hidden_dropout),
            nn.Linear(hidden_dim, num_classes),
        )
    raise ValueError(f"unknown head '{kind}'; valid: {list(HEAD_KINDS)}")
