"""Gradient reversal (Ganin & Lempitsky 2015): identity forward, gradient times ``-lambda`` backward."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class GradientReversalFunction(torch.autograd.Function):
    """``y = x`` forward; ``dL/dx = -lambda * dL/dy`` backward (``lambda`` gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)  # a new tensor node, so autograd calls our backward

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * -ctx.lambda_, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Functional gradient reversal: ``x`` unchanged, its gradient scaled by ``-lambda_``."""
    return GradientReversalFunction.apply(x, lambda_)


def grl_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's GRL schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at ``p = 0``, towards 1 at ``p = 1``.

    Starting at 0 keeps the noisy early domain signal from wrecking the features before the
    label predictor has learned anything (Ganin et al. 2016, section 5.2.2).
    """
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class GradientReversal(nn.Module):
    """Gradient reversal layer with a settable ``lambda_`` (the DANN module sets it every step).

    Example:
        >>> grl = GradientReversal(lambda_=0.5)
        >>> x = torch.ones(3, requires_grad=True)
        >>> grl(x).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """

    def __init__(self, lambda_: float = 1.0):
        super().__init__()
        self.lambda_ = float(lambda_)

    def set_lambda(self, lambda_: float) -> None:
        """Set the reversal scale used by the next forward passes."""
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_:.4g}"
