"""GradualUnfreezing(frozen_head="probe"): the frozen phase's head is the L-BFGS probe's, fitted once."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import tiny_digits
from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.probe import sweep_logistic_regression

pytestmark = pytest.mark.usefixtures("one_thread")


class Heads(Callback):
    """The head's weight at each epoch end, and each epoch's input kind (2: features, 4: images)."""

    def __init__(self):
        self.weight: dict[int, torch.Tensor] = {}
        self.ndim: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ndim.setdefault(trainer.current_epoch, set()).add(batch[0].ndim)

    def on_train_epoch_end(self, trainer, pl_module):
        self.weight[trainer.current_epoch] = pl_module.head[-1].weight.detach().clone()


def model(**kw) -> FineTuneModule:
    seed_everything(0)
    return FineTuneModule(
        num_classes=10,
        backbone="resnet18",
        weights=None,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        channels_last=False,
        **kw,
    )


def fit(tmp_path, epochs, bn="eval", callbacks=(), ckpt_path=None, net=None, **kw):
    net = net or model()
    heads = Heads()
    unfreeze = GradualUnfreezing(
        unfreeze_at_epoch=2, lr_ratio=0.1, bn=bn, frozen_head="probe", **kw
    )
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        enable_checkpointing=bool(callbacks),
        callbacks=[unfreeze, heads, *callbacks],
    )
    dm = tiny_digits(batch_size=16)
    trainer.fit(net, datamodule=dm, ckpt_path=ckpt_path)
    return net, heads, trainer, dm


def independent_probe(dm):
    """Features of the untrained backbone (eval mode) on every train/val image, probed directly."""
    backbone = model().backbone.eval()

    def split(dataset):
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        labels = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        with torch.no_grad():
            return backbone(images), labels

    return sweep_logistic_regression(*split(dm.train_set), *split(dm.val_set), num_classes=10)


def test_frozen_phase_head_is_the_probe_fitted_on_the_same_features(tmp_path):
    net, heads, trainer, dm = fit(tmp_path, 2)
    assert heads.ndim == {0: {2}, 1: {2}}  # both frozen epochs ran their steps, on features
    expected = independent_probe(dm)
    linear = net.head[-1]
    # the frozen steps changed nothing: the head after two epochs is the probe's
    torch.testing.assert_close(heads.weight[0], heads.weight[1], rtol=0, atol=0)
    torch.testing.assert_close(linear.weight, expected.weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(linear.bias, expected.bias, rtol=1e-3, atol=1e-4)
    # same predictions on the validation images
    dm.setup("fit")
    images = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    net.eval()
    with torch.no_grad():
        ours = net(images).argmax(1)
        theirs = (model().backbone.eval()(images) @ expected.weight.T + expected.bias).argmax(1)
    assert torch.equal(ours, theirs)
    # no optimizer state moved for the head (its steps were dropped, not taken at lr 0)
    optimizer = trainer.optimizers[0]
    assert all(p not in optimizer.state or not optimizer.state[p] for p in net.head.parameters())


def test_unfreezes_on_schedule_from_the_probe_head(tmp_path):
    net, heads, _, _ = fit(tmp_path, 3)
    assert heads.ndim == {0: {2}, 1: {2}, 2: {4}}
    torch.testing.assert_close(heads.weight[0], heads.weight[1], rtol=0, atol=0)
    assert not torch.allclose(heads.weight[1], heads.weight[2])  # the unfrozen epoch trains it
    assert any(p.requires_grad for p in net.backbone.parameters())


def test_resume_inside_the_probe_frozen_phase(tmp_path, monkeypatch):
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    reference, *_ = fit(tmp_path, 3, callbacks=[ckpt])
    import tl_lightning.modules.probe_init as probe_init

    calls = []
    real = probe_init.probe_head
    monkeypatch.setattr(probe_init, "probe_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed, heads, _, _ = fit(
        tmp_path,
        3,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt",
    )
    assert calls == []  # the checkpoint holds the probe's head: it is not fitted again
    assert heads.ndim == {1: {2}, 2: {4}}
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_stats_policy_probes_the_adapted_features(tmp_path):
    # bn: stats: the probe sees the features the cached epochs use: train images normalised by
    # their batch's statistics (batches of 16 in the documented fixed order), validation images by
    # the estimated statistics
    net, heads, _, dm = fit(tmp_path, 1, bn="stats")
    assert heads.ndim == {0: {2}}
    dm.setup("fit")
    backbone = net.backbone.eval()  # its BatchNorm statistics: the estimated ones
    n = len(dm.train_set)
    train = torch.stack([dm.train_set[i][0] for i in range(n)])
    val = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    with torch.no_grad():
        val_features = backbone(val)
        for m in backbone.modules():  # batch statistics, running ones left as they are
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
                m.momentum = 0.0
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        train_features = torch.empty(n, val_features.shape[1])
        for rows in order.split(16):
            train_features[rows] = backbone(train[rows])
        assert not torch.allclose(train_features, backbone.eval()(train), atol=1e-3)  # not eval's
        expected = sweep_logistic_regression(
            train_features,
            torch.tensor([int(dm.train_set[i][1]) for i in range(n)]),
            val_features,
            torch.tensor([int(dm.val_set[i][1]) for i in range(len(dm.val_set))]),
            num_classes=10,
        )
    torch.testing.assert_close(net.head[-1].weight, expected.weight, rtol=1e-3, atol=1e-4)


def test_without_the_cache_the_frozen_epochs_train_by_sgd(tmp_path):
    # bn: train cannot be cached: the probe is not fitted, the head trains on images
    net, heads, *_ = fit(tmp_path, 2, bn="train")
    assert heads.ndim == {0: {4}, 1: {4}}
    assert not torch.allclose(heads.weight[0], heads.weight[1])


def test_probe_needs_a_linear_head(tmp_path):
    with pytest.raises(ValueError, match="frozen_head: probe fits a linear head"):
        fit(tmp_path, 1, net=model(head="mlp"))
    with pytest.raises(ValueError, match="frozen_head must be one of"):
        GradualUnfreezing(frozen_head="lbfgs")
