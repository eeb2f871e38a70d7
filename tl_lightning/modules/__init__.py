"""LightningModules, one per transfer-learning strategy."""

from tl_lightning.modules.base import ClassifierModule
from tl_lightning.modules.feature_extraction import FeatureExtractionModule
from tl_lightning.modules.finetune import FineTuneModule

__all__ = ["ClassifierModule", "FeatureExtractionModule", "FineTuneModule"]
