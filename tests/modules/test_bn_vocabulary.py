"""One BatchNorm vocabulary: every module and GradualUnfreezing give each `bn` value one meaning.

For the BN layers a module's ``bn`` governs (frozen groups; ProtoNet: its whole backbone), after
``model.train()``: is the layer in train mode (statistics move) and do its affine weights train?
The expected effects are written out here, not read from the library.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.modules.dann import DANNModule
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.modules.protonet import ProtoNetModule

# value -> (BN layer in train mode, affine weight/bias train)
EFFECT = {
    "eval": (False, False),
    "train": (True, True),
    "affine": (False, True),
    "stats": (True, False),
}
RESNET = {"backbone": "resnet18", "weights": None, "channels_last": False}  # random init


class AtFirstBatch(Callback):
    """GradualUnfreezing sets the policy inside fit: look at the model on the first batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen = governed(pl_module, ["stem"])
        trainer.should_stop = True


def governed(model, frozen_groups: list[str] | None) -> tuple[set, set, set]:
    """(train modes, affine requires_grad, conv requires_grad) of the governed groups."""
    backbone = model.backbone
    groups = [
        g for g in backbone.layer_groups() if frozen_groups is None or g.name in frozen_groups
    ]
    bns = [m for g in groups for m in g.batchnorms.values()]
    bn_params = {id(p) for m in bns for p in m.parameters(recurse=False)}
    others = [p for g in groups for p in g.params if id(p) not in bn_params]
    assert bns and others
    return (
        {m.training for m in bns},
        {p.requires_grad for m in bns for p in m.parameters(recurse=False)},
        {p.requires_grad for p in others},
    )


def build(kind: str, bn: str, backbone: dict):
    """The module with ``bn``, in train mode, and the groups ``bn`` governs (None: all)."""
    if kind == "finetune":
        n = len(FineTuneModule(num_classes=3, **backbone).backbone.group_names())
        return FineTuneModule(num_classes=3, train_groups=n - 1, bn=bn, **backbone).train(), [
            "stem"
        ]
    if kind == "dann":
        return DANNModule(num_classes=3, freeze_groups=["stem"], bn=bn, **backbone).train(), [
            "stem"
        ]
    if kind == "protonet":
        return ProtoNetModule(num_classes=3, bn=bn, **backbone).train(), None
    raise ValueError(kind)


def seen_through_unfreezing(bn: str, backbone: dict, tmp_path) -> tuple[set, set, set]:
    model = FineTuneModule(num_classes=3, **backbone)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,)))
    probe = AtFirstBatch()
    Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[GradualUnfreezing(unfreeze_at_epoch=5, bn=bn, cache_frozen=False), probe],
    ).fit(model, DataLoader(data, batch_size=4))  # fmt: skip
    return probe.seen


@pytest.mark.parametrize("bn", [*EFFECT, "auto"])
@pytest.mark.parametrize("kind", ["finetune", "dann", "unfreezing", "protonet"])
def test_each_bn_value_means_the_same_in_every_module(kind, bn, tmp_path):
    expected_mode, expected_affine = EFFECT["train" if bn == "auto" else bn]  # random init
    if kind == "unfreezing":
        modes, affine, others = seen_through_unfreezing(bn, RESNET, tmp_path)
    elif kind == "protonet" and bn == "eval":  # its old spelling, for one release: `affine`
        expected_mode, expected_affine = EFFECT["affine"]
        with pytest.warns(FutureWarning, match="write bn: affine"):
            model, groups = build(kind, bn, RESNET)
        modes, affine, others = governed(model, groups)
    else:
        model, groups = build(kind, bn, RESNET)
        modes, affine, others = governed(model, groups)
    assert modes == {expected_mode}
    assert affine == {expected_affine}
    assert others == {kind == "protonet"}  # frozen groups' convs never train; ProtoNet's do


@pytest.mark.parametrize("kind", ["finetune", "dann", "protonet"])
def test_auto_keeps_pretrained_statistics(kind):
    pretrained = {"backbone": "efficientnet_lite0", "weights": "DEFAULT", "channels_last": False}
    model, groups = build(kind, "auto", pretrained)
    modes, affine, _ = governed(model, groups)
    assert (modes, affine) == ({EFFECT["affine"][0]}, {EFFECT["affine"][1]})


def test_unfreezing_auto_keeps_pretrained_statistics(tmp_path):
    pretrained = {"backbone": "efficientnet_lite0", "weights": "DEFAULT", "channels_last": False}
    modes, affine, _ = seen_through_unfreezing("auto", pretrained, tmp_path)
    assert (modes, affine) == ({False}, {True})


def test_protonet_old_eval_spelling_warns_and_means_affine():
    with pytest.warns(FutureWarning, match="write bn: affine"):
        model = ProtoNetModule(num_classes=3, bn="eval", **RESNET)
    assert model.bn == "affine" and model.hparams.bn == "affine"
    modes, affine, others = governed(model.train(), None)
    assert (modes, affine, others) == ({False}, {True}, {True})


@pytest.mark.parametrize("kind", ["finetune", "dann", "protonet"])
def test_an_unknown_value_names_the_vocabulary(kind):
    with pytest.raises(
        ValueError, match="unknown bn 'frozen'; valid: eval, train, affine, stats, auto"
    ):
        build(kind, "frozen", RESNET)
    with pytest.raises(ValueError, match="unknown bn 'frozen'"):
        GradualUnfreezing(bn="frozen")
