"""L2-SP and LwF: each term equals its formula, computed here independently, on a small case."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tl_lightning.modules import FineTuneModule
from tl_lightning.regularizers import head_penalty, l2sp_penalty, lwf_loss


def test_l2sp_penalty_by_hand():
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    w0 = [torch.tensor([0.0, 1.0]), torch.tensor([[1.0]])]
    # squared distances: 1 + 1 + 4 = 6; alpha/2 * 6
    assert float(l2sp_penalty(w, w0, alpha=0.1)) == pytest.approx(0.3)
    assert float(head_penalty(w, beta=0.01)) == pytest.approx(0.005 * (1 + 4 + 9))


def test_lwf_loss_is_the_papers_cross_entropy_minus_the_teachers_entropy():
    g = torch.Generator().manual_seed(0)
    s, t, temp = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), 2.0
    total = 0.0
    for i in range(5):  # explicit loop over images and classes
        zt = sum(torch.exp(t[i, k] / temp) for k in range(7))
        zs = sum(torch.exp(s[i, k] / temp) for k in range(7))
        for k in range(7):
            pt = torch.exp(t[i, k] / temp) / zt
            ps = torch.exp(s[i, k] / temp) / zs
            total += float(pt * (torch.log(pt) - torch.log(ps)))
    assert float(lwf_loss(s, t, temp)) == pytest.approx(total / 5, rel=1e-5)
    assert float(lwf_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def regularised_model():
    torch.manual_seed(0)
    model = FineTuneModule(
        num_classes=3, l2sp_alpha=0.1, l2sp_beta=0.01, lwf_alpha=0.7, lwf_temperature=2.0, channels_last=False
    )
    with torch.no_grad():  # move away from the start so L2-SP and LwF are not zero
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_training_step_adds_each_term_with_its_formula(regularised_model):
    model = regularised_model
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    # independent expectations, on a copy in the same (train) mode
    ref = copy.deepcopy(model).train()
    sd, sd0 = ref.backbone.state_dict(), ref.start.backbone.state_dict()
    names = [n for n, _ in ref.backbone.named_parameters()]
    l2sp = 0.1 / 2 * sum(float((sd[n] - sd0[n]).pow(2).sum()) for n in names)
    head = 0.01 / 2 * sum(float(p.detach().pow(2).sum()) for p in ref.head.parameters())
    feats = ref.backbone(x)
    ce_t = F.cross_entropy(ref.head(feats), y)
    with torch.no_grad():  # the teacher is the start in eval mode (pretrained BN statistics)
        teacher = ref.start.source_head(copy.deepcopy(ref.start.backbone).eval()(x))
    student = ref.start.source_head(feats)
    pt = F.softmax(teacher / 2, 1)
    lwf_t = 0.7 * (-(pt * F.log_softmax(student / 2, 1)).sum(1) + (pt * pt.log()).sum(1)).mean()
    l2sp_t = 0.1 / 2 * sum((p - sd0[n]).pow(2).sum() for n, p in ref.backbone.named_parameters())
    head_t = 0.01 / 2 * sum(p.pow(2).sum() for p in ref.head.parameters())
    (ce_t + lwf_t + l2sp_t + head_t).backward()  # the gradient every term should send
    ce, lwf = float(ce_t), float(lwf_t)

    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.train()
    total = model.training_step((x, y), 0)
    assert logged["train/loss"] == pytest.approx(ce, rel=1e-4)
    assert logged["train/l2sp"] == pytest.approx(l2sp, rel=1e-4)
    assert logged["train/l2sp_head"] == pytest.approx(head, rel=1e-4)
    assert logged["train/lwf"] == pytest.approx(lwf, rel=1e-3, abs=1e-6)
    assert lwf > 1e-4 and l2sp > 1e-4
    assert float(total) == pytest.approx(ce + l2sp + head + lwf, rel=1e-4)
    total.backward()  # every term reaches the weights, LwF through the current features
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-2, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_lwf_needs_a_source_classifier():
    with pytest.raises(ValueError, match="pretraining classifier"):
        FineTuneModule(num_classes=3, backbone="resnet18", weights=None, lwf_alpha=1.0)
    with pytest.raises(ValueError, match="l2sp_alpha must be >= 0"):
        FineTuneModule(num_classes=3, backbone="resnet18", weights=None, l2sp_alpha=-1.0)
