"""Shared classifier logic: loss options, schedulers with total steps, checkpoints, predict."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import TINY, quick_trainer, tiny_digits
from tl_lightning.modules import FeatureExtractionModule, FineTuneModule
from tl_lightning.modules.base import balanced_class_weights
from tl_lightning.optim import OneCycleLR, WarmupCosine


def test_balanced_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0] * 6 + [1] * 3 + [2]
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(labels))
    assert balanced_class_weights([6, 3, 1]).tolist() == pytest.approx(expected.tolist())


def test_loss_uses_label_smoothing_weights_and_soft_targets():
    model = FeatureExtractionModule(num_classes=3, label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5], **TINY)
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    ref = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1)
    assert model.loss(logits, target) == pytest.approx(ref.item())
    soft = F.one_hot(target, 3).float()
    assert model.loss(logits, soft).isfinite()


def test_balanced_class_weights_come_from_the_datamodule(tmp_path):
    model = FineTuneModule(num_classes=10, class_weights="balanced", **TINY)  # no feature caching pass: seconds
    dm = tiny_digits()
    quick_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1).fit(model, dm)
    assert model.class_weight.tolist() == pytest.approx(balanced_class_weights(dm.class_counts()).tolist())


@pytest.mark.parametrize("scheduler", [OneCycleLR, WarmupCosine, functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01)])
def test_step_schedulers_get_the_run_length(tmp_path, scheduler):
    model = FineTuneModule(num_classes=10, lr_decay=0.5, lr_scheduler=scheduler, **TINY)
    trainer = quick_trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(model, tiny_digits())
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    assert trainer.global_step == trainer.estimated_stepping_batches == 4
    if isinstance(config.scheduler, OneCycleLR):  # peaks keep the discriminative ratios
        peaks = [g["max_lr"] for g in config.scheduler.optimizer.param_groups]
        assert peaks[1] / peaks[0] == pytest.approx(0.5)


def test_reduce_on_plateau_monitors_val_loss(tmp_path):
    model = FineTuneModule(num_classes=10, lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau, **TINY)
    trainer = quick_trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, tiny_digits())
    assert trainer.lr_scheduler_configs[0].monitor == "val/loss"


def test_checkpoint_reloads_alone_and_predicts_the_same(tmp_path):
    from safetensors.torch import save_file

    # Initial weights from a local file that is deleted before reloading: the checkpoint alone must do.
    source = FeatureExtractionModule(num_classes=10, **TINY).backbone.body.state_dict()
    weights = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(weights))
    model = FeatureExtractionModule(num_classes=10, backbone="resnet18", weights=str(weights), class_names=list("abcdefghij"))
    dm = tiny_digits()
    trainer = quick_trainer(tmp_path, enable_checkpointing=True)
    trainer.fit(model, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    weights.unlink()
    restored = FeatureExtractionModule.load_from_checkpoint(path)
    dm.setup("test")
    x, _ = next(iter(dm.test_dataloader()))
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))
    out = restored.predict_step((x, [f"img{i}" for i in range(len(x))]), 0)
    assert out["probs"].sum(1).allclose(torch.ones(len(x)))
    assert out["class_name"][0] in list("abcdefghij")
