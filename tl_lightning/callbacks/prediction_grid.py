"""A grid of fixed validation images with their true and predicted labels, wrong ones in red."""

from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.callbacks.visual_utils import (
    Samples,
    batched,
    class_names,
    fixed_samples,
    inference,
    tensorboard_writer,
    validation_sets,
    viewable,
)
from tl_lightning.modules.base import ClassifierModule

GREEN, RED = (40, 160, 40), (220, 30, 30)


def prediction_grid(
    images: torch.Tensor,
    true: list[str],
    pred: list[str],
    probs: list[float] | None = None,
    tile: int = 112,
) -> torch.Tensor:
    """One ``[3, H, W]`` image in ``[0, 1]``: tiles captioned ``true``/``pred``, wrong ones framed red.

    Drawn with PIL rather than matplotlib: a few milliseconds per grid, so it can run every epoch.
    """
    from PIL import Image, ImageDraw

    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    border, caption = 4, 28
    cell_w, cell_h = tile + 2 * border, tile + 2 * border + caption
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    tiles = torch.nn.functional.interpolate(images.float(), size=(tile, tile), mode="nearest")
    for i in range(n):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        ok = true[i] == pred[i]
        color = GREEN if ok else RED
        if not ok:  # a thick red frame: mistakes stand out at a glance
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + tile + 2 * border - 1], fill=color)
        pixels = (tiles[i].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        canvas.paste(Image.fromarray(pixels), (x0 + border, y0 + border))
        conf = f" ({probs[i]:.2f})" if probs is not None else ""
        top = y0 + tile + 2 * border + 2
        # the default bitmap font is ~6 px a character: long names are cut to fit the tile
        draw.text((x0 + border, top), f"true {true[i][:14]}", fill=(0, 0, 0))
        draw.text((x0 + border, top + 12), f"pred {pred[i][:9]}{conf}", fill=color)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


class PredictionGrid(Callback):
    """After every validation epoch, shows ``num_images`` fixed validation images with predictions.

    The images are drawn once (seeded, spread over DANN's source and target val splits) and
    kept, so epochs are comparable; they are un-normalised with the backbone's ``data_config``
    mean/std. Logged on rank 0 as the image ``val/predictions``: each tile captioned with its
    true and predicted class and the predicted probability, wrong ones in red with a red frame. For
    :class:`~tl_lightning.modules.base.ClassifierModule` subclasses (a module whose forward
    returns class logits); a no-op without a TensorBoardLogger.

    Example:
        >>> trainer = Trainer(callbacks=[PredictionGrid(num_images=16)], logger=TensorBoardLogger("runs"))
    """

    def __init__(self, num_images: int = 16, every_n_epochs: int = 1, seed: int = 0):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.num_images, self.every_n_epochs, self.seed = num_images, every_n_epochs, seed
        self._sets: list = []
        self._samples: Samples | None = None
        self._unusable = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the image datasets, before a feature-extraction module swaps them for cached features
        if trainer.is_global_zero and stage in ("fit", "validate"):
            self._sets, self._samples, self._unusable = validation_sets(trainer), None, False

    def _ensure_samples(self, trainer: Trainer) -> Samples | None:
        if self._samples is None and not self._unusable:
            self._samples = fixed_samples(
                self._sets or validation_sets(trainer), self.num_images, self.seed
            )
            if self._samples is None:
                self._unusable = True
                rank_zero_info("PredictionGrid: the validation data yields no images; grid off")
        return self._samples

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        writer = tensorboard_writer(trainer)
        if writer is None or not isinstance(pl_module, ClassifierModule):
            return
        samples = self._ensure_samples(trainer)
        if samples is None:
            return
        with inference(trainer, pl_module):
            probs = batched(pl_module, samples.images, pl_module.device).softmax(dim=1)
        conf, pred = probs.max(dim=1)
        names = class_names(trainer, pl_module, probs.shape[1])
        true = [names[i] for i in samples.labels.tolist()]
        predicted = [names[i] for i in pred.tolist()]
        grid = prediction_grid(viewable(samples.images, pl_module), true, predicted, conf.tolist())
        writer.add_image("val/predictions", grid, global_step=trainer.global_step)
