"""TransferModule.log_train: per-step value, and the epoch mean weighted by batch size."""

from __future__ import annotations

import torch
from torch import nn

from tests.helpers import quick_trainer
from tl_lightning.modules.base import TransferModule


class ConstantLoss(TransferModule):
    """The loss of a batch is its mean value: batches [1.0] and [5.0, 5.0, 5.0] give losses 1 and 5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def configure_optimizers(self):
        return torch.optim.SGD([self.w], lr=0.0)

    def training_step(self, batch, batch_idx):
        loss = batch.mean() + 0.0 * self.w.sum()
        self.log_train("train/loss", loss, batch_size=len(batch))
        self.log_train("train/size", torch.tensor(float(len(batch))), batch_size=len(batch), on_step=False)
        return loss


def test_epoch_mean_is_weighted_by_batch_size_and_step_value_is_the_last_step(tmp_path):
    batches = [torch.full((1,), 1.0), torch.full((3,), 5.0)]
    trainer = quick_trainer(tmp_path, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(ConstantLoss(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    m = trainer.callback_metrics
    assert float(m["train/loss_epoch"]) == (1 * 1.0 + 3 * 5.0) / 4  # 4.0, not the plain mean 3.0
    assert float(m["train/loss"]) == 5.0  # the step value: the last batch's
    assert float(m["train/size"]) == (1 * 1 + 3 * 3) / 4  # on_step=False: the epoch mean under its own name
    assert "train/size_epoch" not in m
