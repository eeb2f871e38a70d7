"""CUDA checks (marked ``gpu``, skipped without a GPU): mixed precision, channels_last, pinned copies."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from tl_lightning.data import DigitsDataModule
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.precision import TLTrainer

CUDA = torch.cuda.is_available()
BF16 = CUDA and torch.cuda.is_bf16_supported()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

AUTOCAST_DTYPE = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16, "32-true": torch.float32}


class FirstConvProbe(Callback):
    """Records what the backbone's first convolution sees and returns during training steps."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        conv = next(m for m in pl_module.backbone.modules() if isinstance(m, torch.nn.Conv2d))

        def hook(module, inputs, output):
            if module.training:
                x = inputs[0]
                self.seen.append(
                    {
                        "device": x.device.type,
                        "input_channels_last": x.is_contiguous(memory_format=torch.channels_last),
                        "weight_channels_last": module.weight.is_contiguous(
                            memory_format=torch.channels_last
                        ),
                        "out_dtype": output.dtype,
                    }
                )

        conv.register_forward_hook(hook)


class BatchTransferProbe(FineTuneModule):
    """FineTuneModule that records whether batches arrive pinned and leave on the GPU."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pinned: list[bool] = []
        self.arrived: list[str] = []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.pinned.append(batch[0].is_pinned())
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.arrived.append(batch[0].device.type)
        return batch


def tiny_fit(precision: str, module=FineTuneModule, callbacks=(), steps: int = 3):
    seed_everything(0)
    model = module(num_classes=10, backbone="resnet18", weights=None)
    dm = DigitsDataModule(backbone="resnet18", weights=None, image_size=32, batch_size=16)
    trainer = Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)
    return model, trainer, start


@pytest.mark.parametrize(
    "precision",
    [
        "16-mixed",
        pytest.param(
            "bf16-mixed",
            marks=pytest.mark.skipif(not BF16, reason="needs a GPU with bf16 (Ampere or newer)"),
        ),
    ],
)
def test_mixed_precision_fit_autocasts_on_channels_last_and_learns(precision):
    probe = FirstConvProbe()
    model, trainer, start = tiny_fit(precision, callbacks=[probe])
    assert trainer.global_step == 3 and len(probe.seen) == 3
    for seen in probe.seen:
        assert seen["device"] == "cuda"
        assert seen["out_dtype"] == AUTOCAST_DTYPE[precision]
        assert seen["input_channels_last"] and seen["weight_channels_last"]
    # fp16 needs loss scaling; bf16 has fp32's range and must not scale
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")
    # master weights stay fp32, finite, and moved
    state = model.state_dict()
    assert all(v.dtype == start[k].dtype for k, v in state.items())
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    head = [k for k in start if k.startswith("head.")]
    assert head and any(not torch.equal(state[k].cpu(), start[k]) for k in head)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_batches_come_pinned_and_copy_to_the_gpu_without_blocking(monkeypatch):
    copies = []
    original_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        out = original_to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            copies.append((self.is_pinned(), kwargs.get("non_blocking", False)))
        return out

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    model, trainer, _ = tiny_fit("32-true", module=BatchTransferProbe)
    assert trainer.train_dataloader.pin_memory
    assert model.pinned and all(model.pinned)  # the host copy is page-locked
    assert set(model.arrived) == {"cuda"}
    batch_copies = [c for c in copies if c[0]]
    assert batch_copies and all(non_blocking for _, non_blocking in batch_copies)


def test_precision_mixed_picks_by_this_gpus_capability():
    trainer = TLTrainer(accelerator="gpu", devices=1, precision="mixed", logger=False)
    assert trainer.precision == ("bf16-mixed" if BF16 else "16-mixed")
