"""Small builders shared by tests: tiny models and data that train in a second on CPU."""

from __future__ import annotations

from lightning.pytorch import Trainer

from tl_lightning.data import DigitsDataModule

TINY = {"backbone": "resnet18", "weights": None}


def tiny_digits(**kwargs) -> DigitsDataModule:
    """Real digits at 32 px with a random-init resnet18's preprocessing."""
    kwargs = {"image_size": 32, "batch_size": 32, **TINY, **kwargs}
    return DigitsDataModule(**kwargs)


def quick_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    return Trainer(**{**defaults, **kwargs})
