"""LP-FT: after stage one the head is exactly the linear probe's head on the starting features."""

from __future__ import annotations

import functools

import torch
from lightning.pytorch import Callback

from tests.helpers import quick_trainer, tiny_digits
from tl_lightning.modules import FineTuneModule
from tl_lightning.probe import sweep_logistic_regression


class HeadAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weight = pl_module.head[-1].weight.detach().clone()
        self.bias = pl_module.head[-1].bias.detach().clone()


@torch.no_grad()
def _features(backbone, dataset):
    backbone.eval()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.cat([backbone(torch.stack(xs[i : i + 64])) for i in range(0, len(xs), 64)]), torch.tensor(ys)


def test_head_after_stage_one_equals_the_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = FineTuneModule(
        num_classes=10, backbone="resnet18", weights=None, init_head="probe", channels_last=False,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )
    dm = tiny_digits(batch_size=64)
    dm.setup("fit")
    # the probe computed here, independently of the module's cache
    train_f, train_y = _features(model.backbone, dm.train_set)
    val_f, val_y = _features(model.backbone, dm.val_set)
    expected = sweep_logistic_regression(train_f, train_y, val_f, val_y, 10)

    seen = HeadAtTrainStart()
    trainer = quick_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, callbacks=[seen])
    trainer.fit(model, dm)
    torch.testing.assert_close(seen.weight, expected.weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(seen.bias, expected.bias, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(model.start.head[-1].weight, seen.weight)  # WiSE-FT's start has the probe head
    assert bool(model.head_from_probe)
    assert not torch.allclose(model.head[-1].weight, seen.weight)  # then fine-tuning moved it

    # a resumed run does not fit the probe again
    model.probe_result = None
    trainer2 = quick_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer2.fit(model, dm)
    assert model.probe_result is None
