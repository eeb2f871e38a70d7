"""Every module trains on the CPU under bf16-mixed autocast with channels_last (DANN: test_dann.py)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

from tests.helpers import TINY, quick_trainer, tiny_digits
from tests.modules.test_protonet import TINY as FEW_SHOT
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.modules import FeatureExtractionModule, FineTuneModule
from tl_lightning.modules.protonet import ProtoNetModule


def classifier(module):
    # uncached: the backbone runs inside the training step, where the probe watches it
    extra = {"cache_features": False} if module is FeatureExtractionModule else {}
    return module(num_classes=10, channels_last=True, **TINY, **extra), tiny_digits(batch_size=8)


def protonet(_):
    model = ProtoNetModule(
        backbone="conv4", weights=None, num_classes=FEW_SHOT["way"], channels_last=True
    )
    return model, FewShotDataModule(**FEW_SHOT)


@pytest.mark.parametrize(
    ("build", "module"),
    [(classifier, FineTuneModule), (classifier, FeatureExtractionModule), (protonet, None)],
    ids=["finetune", "feature_extraction", "protonet"],
)
def test_training_steps_run_in_bf16_on_channels_last_and_learn(tmp_path, build, module):
    seed_everything(0)
    model, data = build(module)
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = quick_trainer(tmp_path, precision="bf16-mixed", max_steps=2, limit_val_batches=0)
    trainer.fit(model, data)

    images, features = seen[-1]  # the last training step (seen[0] may be the setup size probe)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert features.dtype == torch.bfloat16  # autocast reached the backbone
    assert trainer.global_step == 2
    moved = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert moved, "no trainable parameter changed"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed: fp32 master weights
