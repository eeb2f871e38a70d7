"""The four BatchNorm policies of a frozen group, each checked after a real training step and a .train() call."""

from __future__ import annotations

import pytest
import torch

from tl_lightning.backbones import build_backbone

# policy -> (running statistics update?, affine parameters train?), as documented in BNPolicy
EXPECTED = {
    "eval": (False, False),
    "train": (True, True),
    "affine": (False, True),
    "stats": (True, False),
}


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_frozen_batchnorm_follows_its_policy_through_a_training_step(policy):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", weights=None)
    head = torch.nn.Linear(backbone.feature_dim, 2)
    backbone.freeze(bn=policy)
    backbone.train()  # Lightning calls .train() every epoch: the policy must survive it
    bn = backbone.layer_groups()[0].batchnorms
    assert bn, "resnet18's stem has a BatchNorm"
    (name, layer), *_ = bn.items()
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    params = [p for p in [*backbone.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    x = torch.randn(8, 3, 16, 16) * 3 + 1  # far from the initial statistics (mean 0, var 1)
    loss = torch.nn.functional.cross_entropy(head(backbone(x)), torch.tensor([0, 1] * 4))
    loss.backward()
    opt.step()
    after = backbone.state_dict()

    stats_move, affine_moves = EXPECTED[policy]
    prefix = next(k for k in before if k.endswith("running_mean")).rsplit(".", 1)[0]
    assert layer.training == stats_move, policy  # batch statistics are used only in train mode
    assert (
        not torch.equal(before[f"{prefix}.running_mean"], after[f"{prefix}.running_mean"])
    ) == stats_move
    assert (not torch.equal(before[f"{prefix}.weight"], after[f"{prefix}.weight"])) == affine_moves
    assert (not torch.equal(before[f"{prefix}.bias"], after[f"{prefix}.bias"])) == affine_moves
    convs = [k for k in before if k.endswith(".weight") and before[k].ndim == 4]
    assert convs and all(torch.equal(before[k], after[k]) for k in convs)  # frozen: never move


def test_unfreeze_hands_batchnorm_back_to_batch_statistics():
    backbone = build_backbone("resnet18", weights=None)
    backbone.freeze(bn="eval")
    backbone.unfreeze()
    backbone.train()
    assert all(m.training for g in backbone.layer_groups() for m in g.batchnorms.values())
    assert all(p.requires_grad for p in backbone.parameters())
