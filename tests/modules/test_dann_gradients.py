"""DANN's training step, checked against the paper's gradient: d(class)/dθ - λ·w·d(domain)/dθ on the features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
from tl_lightning.modules.dann import DANNModule

# training_step runs without a Trainer here: its self.log calls are no-ops
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
]

TINY = dict(
    backbone="dann_cnn",
    weights=None,
    head_hidden_dims=[8],
    domain_hidden_dims=[8],
    domain_dropout=0.0,  # deterministic: the reference pass must see the same network
    channels_last=False,
)


def _model_and_batch(lam: float, weight: float, source_only: bool = False):
    torch.manual_seed(0)
    model = DANNModule(
        num_classes=3, domain_loss_weight=weight, source_only=source_only, **TINY
    ).double()
    model.current_grl_lambda = lambda: 0.0 if source_only else lam  # a point on the schedule
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(4, 3, 28, 28, generator=g, dtype=torch.double)
    ys = torch.tensor([0, 1, 2, 1])
    xt = torch.randn(4, 3, 28, 28, generator=g, dtype=torch.double)
    return model, {"source": (xs, ys), "target": xt}, xs, ys, xt


def _reference_grads(model, xs, ys, xt):
    """Gradients of the class and domain losses, each on its own, with no reversal anywhere."""
    model.train()
    feats = model.features(torch.cat([xs, xt]))
    class_loss = F.cross_entropy(model.head(feats[: len(xs)]), ys)
    domain_logits = model.domain_head(feats).squeeze(1)
    domain_target = torch.tensor([0.0] * len(xs) + [1.0] * len(xt), dtype=torch.double)
    domain_loss = F.binary_cross_entropy_with_logits(domain_logits, domain_target)
    params = dict(model.named_parameters())
    gc = torch.autograd.grad(
        class_loss, list(params.values()), retain_graph=True, allow_unused=True
    )
    gd = torch.autograd.grad(domain_loss, list(params.values()), allow_unused=True)
    zero = [torch.zeros_like(p) for p in params.values()]
    gc = {n: g if g is not None else z for n, g, z in zip(params, gc, zero)}
    gd = {n: g if g is not None else z for n, g, z in zip(params, gd, zero)}
    return gc, gd, class_loss.detach(), domain_loss.detach()


def _step_grads(model, batch):
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    loss = model.training_step(batch, 0)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, loss.detach()


@pytest.mark.parametrize("lam,weight", [(0.6, 1.0), (0.6, 0.35), (1.0, 2.0)])
def test_backbone_gradient_is_class_gradient_minus_lambda_times_weighted_domain_gradient(
    lam, weight
):
    model, batch, xs, ys, xt = _model_and_batch(lam, weight)
    gc, gd, class_loss, domain_loss = _reference_grads(model, xs, ys, xt)
    grads, loss = _step_grads(model, batch)

    torch.testing.assert_close(
        loss.double(), class_loss + weight * domain_loss, rtol=1e-6, atol=1e-7
    )
    backbone = [n for n in grads if n.startswith("backbone.")]
    assert backbone and any(gd[n].abs().sum() > 0 for n in backbone)
    for n in backbone:  # reversed and scaled on the feature extractor...
        torch.testing.assert_close(grads[n], gc[n] - lam * weight * gd[n], rtol=1e-5, atol=1e-7)
    for n in grads:
        if n.startswith("domain_head."):  # ...but the domain head itself minimises its loss
            torch.testing.assert_close(grads[n], weight * gd[n], rtol=1e-5, atol=1e-7)
        elif n.startswith("head."):
            torch.testing.assert_close(grads[n], gc[n], rtol=1e-5, atol=1e-7)


def test_source_only_sends_no_domain_gradient_to_the_features():
    model, batch, xs, ys, xt = _model_and_batch(0.6, 0.35, source_only=True)
    gc, gd, class_loss, domain_loss = _reference_grads(model, xs, ys, xt)
    grads, loss = _step_grads(model, batch)
    torch.testing.assert_close(
        loss.double(), class_loss + domain_loss, rtol=1e-6, atol=1e-7
    )  # the baseline's weight is 1
    for n in grads:
        if n.startswith("backbone."):
            torch.testing.assert_close(grads[n], gc[n], rtol=1e-5, atol=1e-7)
        elif n.startswith("domain_head."):
            torch.testing.assert_close(grads[n], gd[n], rtol=1e-5, atol=1e-7)


def test_training_step_uses_the_scheduled_lambda():
    model, batch, *_ = _model_and_batch(0.0, 1.0)
    del model.current_grl_lambda  # back to the real schedule: p = 0 without a trainer -> 0
    model.training_step(batch, 0)
    assert model.grl.lambda_ == 0.0
    model.current_grl_lambda = lambda: 0.42
    model.training_step(batch, 0)
    assert model.grl.lambda_ == 0.42
