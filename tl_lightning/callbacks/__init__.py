"""Callbacks: prediction writing (and, as they land, unfreezing and visual logging)."""

from tl_lightning.callbacks.lr_monitor import LRMonitor
from tl_lightning.callbacks.prediction_writer import CSVPredictionWriter
from tl_lightning.callbacks.unfreezing import GradualUnfreezing

__all__ = ["CSVPredictionWriter", "GradualUnfreezing", "LRMonitor"]
