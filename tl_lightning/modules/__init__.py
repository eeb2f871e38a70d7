"""LightningModules, one per transfer-learning strategy."""

from tl_lightning.modules.base import ClassifierModule
from tl_lightning.modules.dann import DANNModule
from tl_lightning.modules.feature_extraction import FeatureExtractionModule
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.modules.grl import GradientReversal
from tl_lightning.modules.protonet import ProtoNetModule, predict_few_shot

__all__ = [
    "ClassifierModule",
    "DANNModule",
    "FeatureExtractionModule",
    "FineTuneModule",
    "GradientReversal",
    "ProtoNetModule",
    "predict_few_shot",
]
