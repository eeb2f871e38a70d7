"""Regularisers that keep fine-tuning close to its starting point: L2-SP and LwF.

- L2-SP (Li, Grandvalet, Davoine 2018, "Explicit inductive bias for transfer learning with
  convolutional networks"): ``alpha/2 ||w - w0||^2`` over the pretrained weights (``w0`` the
  starting point, not 0 as weight decay assumes) plus ``beta/2 ||w_head||^2`` on the new head.
  Paper defaults: alpha 0.01-0.1 (0.1 in most of its experiments), beta 0.01.
- LwF (Li, Hoiem 2016, "Learning without Forgetting"): distil the original network's source-class
  outputs, softened by temperature ``T``, into the current backbone + the kept source classifier.
  Paper defaults: T = 2, weight (lambda_o) 1.

Example:
    >>> w, w0 = [torch.ones(3)], [torch.zeros(3)]
    >>> float(l2sp_penalty(w, w0, alpha=0.1))      # 0.1 / 2 * 3
    0.15000000000000002
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def l2sp_penalty(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor], alpha: float) -> torch.Tensor:
    """``alpha / 2 * sum ||p - p0||^2`` over paired tensors (fp32 whatever the autocast)."""
    total = None
    for p, p0 in zip(params, anchors, strict=True):
        term = (p.float() - p0.float()).square().sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l2sp_penalty got no parameters")
    return 0.5 * alpha * total


def head_penalty(params: Iterable[torch.Tensor], beta: float) -> torch.Tensor:
    """``beta / 2 * sum ||p||^2``: L2-SP's plain L2 on the new layers, which have no starting point."""
    params = list(params)
    if not params:
        raise ValueError("head_penalty got no parameters")
    return 0.5 * beta * sum(p.float().square().sum() for p in params)


def lwf_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch of ``KL(softmax(t/T) || softmax(s/T))``.

    LwF's loss is the cross-entropy ``-sum softmax(t/T) log softmax(s/T)``; the KL differs from it
    by the teacher's entropy, a constant, so the gradients are the same and the logged value is 0
    at the start instead of the teacher's entropy. No ``T^2`` factor (the paper has none).
    """
    if temperature <= 0:
        raise ValueError(f"lwf temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
