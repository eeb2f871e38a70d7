"""Callbacks: unfreezing, prediction writing, TensorBoard visuals, fault tolerance."""

from tl_lightning.callbacks.confusion_figure import ConfusionMatrixFigure
from tl_lightning.callbacks.embedding_projector import EmbeddingProjector
from tl_lightning.callbacks.episode_histogram import EpisodeAccuracyHistogram
from tl_lightning.callbacks.finite_loss import FiniteLossCheck, NonFiniteLossError
from tl_lightning.callbacks.forgetting import ForgettingMonitor
from tl_lightning.callbacks.hparams_metrics import HParamsMetrics
from tl_lightning.callbacks.lr_monitor import LRMonitor
from tl_lightning.callbacks.prediction_grid import PredictionGrid
from tl_lightning.callbacks.prediction_writer import CSVPredictionWriter
from tl_lightning.callbacks.resumable_checkpoint import ResumableModelCheckpoint
from tl_lightning.callbacks.rng_state import RNGStateCheckpoint
from tl_lightning.callbacks.skipped_images import SkippedImagesReport
from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.callbacks.visuals import TensorBoardVisuals
from tl_lightning.callbacks.wise_ft import WiseFT

__all__ = [
    "CSVPredictionWriter",
    "ConfusionMatrixFigure",
    "EmbeddingProjector",
    "EpisodeAccuracyHistogram",
    "FiniteLossCheck",
    "ForgettingMonitor",
    "GradualUnfreezing",
    "HParamsMetrics",
    "LRMonitor",
    "NonFiniteLossError",
    "PredictionGrid",
    "RNGStateCheckpoint",
    "ResumableModelCheckpoint",
    "SkippedImagesReport",
    "TensorBoardVisuals",
    "WiseFT",
]
