"""What the TensorBoard visual callbacks share: the writer, fixed validation samples, viewable images.

Every visual callback writes on global rank 0 only and never runs a collective, so under DDP the
other ranks simply do not wait for it; without a TensorBoardLogger (``logger: false``,
``fast_dev_run``, a CSV logger) :func:`tensorboard_writer` returns ``None`` and the callback does
nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


def tensorboard_logger(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's first TensorBoardLogger (on any rank), or ``None``."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def tensorboard_writer(trainer: Trainer) -> SummaryWriter | None:
    """The run's ``SummaryWriter`` on global rank 0; ``None`` elsewhere or without TensorBoard."""
    logger = tensorboard_logger(trainer)
    if logger is None or not trainer.is_global_zero:
        return None
    return logger.experiment


def class_names(trainer: Trainer, module: LightningModule, n: int) -> list[str]:
    """Names of class ids ``0..n-1``: the datamodule's, else the module's, else the ids."""
    for owner in (getattr(trainer, "datamodule", None), module):
        names = getattr(owner, "class_names", None)
        if names and len(names) >= n:
            return [str(c) for c in names]
    return [str(i) for i in range(n)]


def validation_sets(trainer: Trainer) -> list[tuple[str, Dataset]]:
    """``[(name, image dataset)]`` of the validation split(s): ``val``, or DANN's source/target.

    Read from the datamodule (its images, also where it serves cached features instead), else
    from the validation dataloaders.
    """
    dm = getattr(trainer, "datamodule", None)
    if hasattr(dm, "val_image_sets") and dm.val_image_sets():
        return dm.val_image_sets()  # images, even where features replace them
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    names = {1: ["val"], 2: ["source", "target"]}.get(
        len(loaders), [f"val{i}" for i in range(len(loaders))]
    )
    out = []
    for name, loader in zip(names, loaders, strict=True):
        dataset = getattr(loader, "dataset", None)
        # an episodic IndexDataset yields indices: its images live in `.dataset`
        if hasattr(dataset, "labels") and isinstance(getattr(dataset, "dataset", None), Dataset):
            dataset = dataset.dataset
        if dataset is not None:
            out.append((name, dataset))
    return out


@dataclass
class Samples:
    """A fixed set of validation images ``[N, 3, H, W]`` (normalised), labels ``[N]``, split names."""

    images: torch.Tensor
    labels: torch.Tensor
    split: list[str]


def fixed_samples(sets: list[tuple[str, Dataset]], n: int, seed: int) -> Samples | None:
    """Up to ``n`` samples spread evenly over ``sets``, drawn once with ``seed``.

    Items that are not ``(image [3, H, W], class id)`` are skipped; ``None`` when none is
    (e.g. cached feature vectors).
    """
    images, labels, split = [], [], []
    per_set = math.ceil(n / max(1, len(sets)))
    generator = torch.Generator().manual_seed(seed)
    for name, dataset in sets:
        order = torch.randperm(len(dataset), generator=generator)[:per_set].sort().values
        for i in order.tolist():
            item = dataset[i]
            # skip what is not (image, class id): unreadable files, cached feature vectors
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                continue
            x, y = item[0], item[1]
            if not isinstance(x, torch.Tensor) or x.ndim != 3 or isinstance(y, str):
                continue
            images.append(x)
            labels.append(int(y))
            split.append(name)
    if not images:
        return None
    return Samples(torch.stack(images[:n]), torch.tensor(labels[:n]), split[:n])


def viewable(images: torch.Tensor, module: LightningModule) -> torch.Tensor:
    """Normalised images -> RGB in ``[0, 1]`` using the backbone's mean/std (min-max otherwise)."""
    images = images.detach().float().cpu()
    config = getattr(getattr(module, "backbone", None), "data_config", None)
    if config is not None:
        mean = torch.tensor(config.mean).view(1, -1, 1, 1)
        std = torch.tensor(config.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp(min=1e-8)


def thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square ``size`` x ``size`` thumbnails of ``[N, 3, H, W]`` images in ``[0, 1]``."""
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)


@contextlib.contextmanager
def inference(trainer: Trainer, module: LightningModule) -> Iterator[None]:
    """Eval mode, no grad and the trainer's precision context; the training mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            yield
    finally:
        module.train(was_training)


def batched(fn, images: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """``fn`` over ``images`` in chunks on ``device``; float32 results on the CPU."""
    outs = [
        fn(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(outs)
