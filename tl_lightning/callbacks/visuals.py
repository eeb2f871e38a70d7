"""One switchable bundle of the TensorBoard visual callbacks (the CLI's ``visuals`` group)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from tl_lightning.callbacks.confusion_figure import ConfusionMatrixFigure
from tl_lightning.callbacks.embedding_projector import EmbeddingProjector
from tl_lightning.callbacks.episode_histogram import EpisodeAccuracyHistogram
from tl_lightning.callbacks.hparams_metrics import HParamsMetrics
from tl_lightning.callbacks.prediction_grid import PredictionGrid


class TensorBoardVisuals(Callback):
    """Everything tl-lightning draws in TensorBoard, each part switchable.

    - ``confusion_matrix``: figure ``val/confusion_matrix`` after each validation (``test/...``
      after a test), class names on the axes (classifiers: feature extraction, fine-tuning, DANN).
    - ``images``: image ``val/predictions``, ``num_images`` fixed validation images with true and
      predicted labels, wrong ones in red (classifiers).
    - ``embeddings``: the Projector tab (``val/features``), ``embedding_samples`` validation
      features with class (and DANN domain) metadata and thumbnails, at the end of training and
      every ``embedding_every_n_epochs`` (null: only at the end).
    - ``episode_histogram``: ProtoNet's per-episode accuracies, histograms ``val/episode_acc``,
      ``test/episode_acc``.
    - ``hparams``: the HParams tab: hyperparameters with the final ``val/*``/``test/*`` metrics
      (and no placeholder ``hp_metric``).

    Images and figures are drawn every ``every_n_epochs`` validations. Scalars (losses,
    accuracies, per-group learning rates, the unfreezing phase, DANN's ``grl_lambda`` and
    ``domain_acc``) come from the modules, ``LRMonitor`` and ``GradualUnfreezing``. Everything
    runs on rank 0 with no collective; nothing happens without a TensorBoardLogger.

    Example:
        >>> trainer = Trainer(callbacks=[TensorBoardVisuals(images=False, embedding_samples=500)],
        ...                   logger=TensorBoardLogger("runs"))

    From the CLI: ``--visuals.images=false --visuals.embedding_samples=500``.
    """

    def __init__(
        self,
        confusion_matrix: bool = True,
        images: bool = True,
        embeddings: bool = True,
        episode_histogram: bool = True,
        hparams: bool = True,
        every_n_epochs: int = 1,
        num_images: int = 16,
        embedding_samples: int = 256,
        embedding_every_n_epochs: int | None = None,
        thumbnail_size: int = 32,
        seed: int = 0,
    ):
        parts: list[Callback] = []
        if confusion_matrix:
            parts.append(ConfusionMatrixFigure(every_n_epochs))
        if images:
            parts.append(PredictionGrid(num_images, every_n_epochs, seed))
        if embeddings:
            parts.append(
                EmbeddingProjector(
                    embedding_samples, embedding_every_n_epochs, thumbnail_size, seed
                )
            )
        if episode_histogram:
            parts.append(EpisodeAccuracyHistogram())
        if hparams:
            parts.append(HParamsMetrics())
        self.parts = parts

    def _each(self, hook: str, *args: Any) -> None:
        for part in self.parts:
            getattr(part, hook)(*args)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._each("setup", trainer, pl_module, stage)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._each("on_validation_end", trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._each("on_train_end", trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._each("on_test_end", trainer, pl_module)
