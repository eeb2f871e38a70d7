"""WiSE-FT at the end of fitting: choose the interpolation ``a`` on validation, save that checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.forgetting import ReferenceSet
from tl_lightning.wise_ft import DEFAULT_GRID, WiseFTResult, wise_ft


class WiseFT(Callback):
    """After ``fit``, evaluate ``(1 - a) theta_0 + a theta_ft`` on the val split over ``grid``, keep the best.

    Loads the chosen weights into the module (so a following ``test`` evaluates them), saves
    ``<dirpath>/wise_ft.ckpt`` (default: the trainer's log dir) and logs the curve as
    ``wise_ft/val_acc``, ``wise_ft/source_agreement`` and ``wise_ft/cka_drift`` with step
    ``round(100 a)``, and the choice as ``wise_ft/a``. Never looks at test data.

    Args:
        grid: the values of ``a`` (1.0 = the fine-tuned model, 0.0 = the start).
        dirpath: where ``wise_ft.ckpt`` goes; None = ``trainer.log_dir`` or ``default_root_dir``.
        num_reference_images: size of the default reference set for source agreement (0 = none).

    Example:
        >>> trainer = Trainer(callbacks=[WiseFT(grid=[0, 0.25, 0.5, 0.75, 1])])
    """

    def __init__(self, grid: Sequence[float] = DEFAULT_GRID, dirpath: str | None = None, num_reference_images: int = 64, reference_image_size: int | None = None):
        self.grid, self.dirpath = list(grid), dirpath
        self.num_reference_images, self.reference_image_size = num_reference_images, reference_image_size
        self.result: WiseFTResult | None = None
        self.checkpoint_path: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "keep_start"):
            raise TypeError(f"WiseFT needs a FineTuneModule, got {type(pl_module).__name__}")
        pl_module.keep_start()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted:
            return
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("WiseFT chooses `a` on the datamodule's val_dataloader(); fit with a datamodule")
        reference = None
        if self.num_reference_images and pl_module.start.source_head is not None:
            reference = ReferenceSet.default(pl_module.backbone.data_config, self.num_reference_images, self.reference_image_size)
        self.result = wise_ft(
            pl_module, datamodule.val_dataloader(), self.grid, reference, trainer.precision_plugin.forward_context
        )
        for row in self.result.curve:
            metrics = {f"wise_ft/{k}": v for k, v in row.items() if k != "a"}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=round(100 * row["a"]))
        for logger in trainer.loggers:
            logger.log_metrics({"wise_ft/a": self.result.a}, step=trainer.global_step)
        folder = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        self.checkpoint_path = folder / "wise_ft.ckpt"
        trainer.save_checkpoint(self.checkpoint_path, weights_only=True)  # a collective under DDP
        rank_zero_info(f"WiSE-FT: a={self.result.a:g} chosen on validation; saved {self.checkpoint_path}")
