"""TensorBoard's embedding projector: validation features with label metadata and thumbnails."""

from __future__ import annotations

from collections.abc import Callable

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
    thumbnails,
    validation_sets,
    viewable,
)


def embedding_fn(module: LightningModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """What to project: ProtoNet's ``embed``, a classifier's pooled ``features``, else ``forward``."""
    for name in ("embed", "features"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    return module


class EmbeddingProjector(Callback):
    """Writes validation embeddings for TensorBoard's Projector tab at the end of training.

    A fixed, seeded sample of at most ``max_samples`` validation images (spread evenly over
    DANN's source and target val splits) is embedded on rank 0: a classifier's pooled features
    (``module.features``: feature extraction, fine-tuning, DANN), ProtoNet's embedding
    (``module.embed``). Metadata: the class name, plus the domain (``source``/``target``) for
    DANN; thumbnails of ``thumbnail_size`` px (un-normalised with the backbone's mean/std) make
    the sprite. ``every_n_epochs`` also writes one after every n-th validation (each under its
    own step). Tag: ``val/features``. A no-op without a TensorBoardLogger.

    Example:
        >>> trainer = Trainer(callbacks=[EmbeddingProjector(max_samples=300)],
        ...                   logger=TensorBoardLogger("runs"))
    """

    def __init__(
        self,
        max_samples: int = 256,
        every_n_epochs: int | None = None,
        thumbnail_size: int = 32,
        seed: int = 0,
    ):
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or null, got {every_n_epochs}")
        if thumbnail_size < 4:
            raise ValueError(f"thumbnail_size must be >= 4 px, got {thumbnail_size}")
        self.max_samples, self.every_n_epochs = max_samples, every_n_epochs
        self.thumbnail_size, self.seed = thumbnail_size, seed
        self._sets: list = []
        self._samples: Samples | None = None
        self._logged_steps: set[int] = set()

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # the image datasets, before a feature-extraction module swaps them for cached features
        if trainer.is_global_zero and stage == "fit":
            self._sets, self._samples = validation_sets(trainer), None
            self._logged_steps = set()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = self.every_n_epochs
        if n and not trainer.sanity_checking and (trainer.current_epoch + 1) % n == 0:
            self.log_embeddings(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.log_embeddings(trainer, pl_module)

    def log_embeddings(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Embed the fixed sample and write it for the projector (once per global step)."""
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or step in self._logged_steps:
            return
        if self._samples is None:
            self._samples = fixed_samples(
                self._sets or validation_sets(trainer), self.max_samples, self.seed
            )
            if self._samples is None:
                rank_zero_info("EmbeddingProjector: the validation data yields no images; skipped")
                self._logged_steps.add(step)
                return
        samples = self._samples
        with inference(trainer, pl_module):
            features = batched(embedding_fn(pl_module), samples.images, pl_module.device)
        names = class_names(trainer, pl_module, int(samples.labels.max()) + 1)
        labels = [names[i] for i in samples.labels.tolist()]
        domains = sorted(set(samples.split))
        if len(domains) > 1:
            metadata: list = [[c, d] for c, d in zip(labels, samples.split, strict=True)]
            header: list[str] | None = ["label", "domain"]
        else:
            metadata, header = labels, None
        images = thumbnails(viewable(samples.images, pl_module), self.thumbnail_size)
        writer.add_embedding(
            features.flatten(1),
            metadata=metadata,
            label_img=images,
            global_step=step,
            tag="val/features",
            metadata_header=header,
        )
        self._logged_steps.add(step)
