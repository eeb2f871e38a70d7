"""tl-lightning: PyTorch Lightning modules for transfer learning on images.

Public API (imported lazily so ``import tl_lightning`` stays light)::

    from tl_lightning import build_backbone, FeatureExtractionModule, FineTuneModule, DigitsDataModule
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Backbone": "tl_lightning.backbones",
    "DataConfig": "tl_lightning.backbones",
    "build_backbone": "tl_lightning.backbones",
    "list_backbones": "tl_lightning.backbones",
    "register_backbone": "tl_lightning.backbones",
    "build_head": "tl_lightning.heads",
    "ClassifierModule": "tl_lightning.modules",
    "FeatureExtractionModule": "tl_lightning.modules",
    "FineTuneModule": "tl_lightning.modules",
    "DANNModule": "tl_lightning.modules",
    "GradientReversal": "tl_lightning.modules",
    "DomainAdaptationDataModule": "tl_lightning.data",
    "DigitsMDataModule": "tl_lightning.data",
    "DigitsMSource": "tl_lightning.data",
    "DigitsSource": "tl_lightning.data",
    "CIFAR10Source": "tl_lightning.data",
    "CatsDogsSource": "tl_lightning.data",
    "ClassificationDataModule": "tl_lightning.data",
    "Flowers102Source": "tl_lightning.data",
    "ImageFolderSource": "tl_lightning.data",
    "ImageSource": "tl_lightning.data",
    "ProtoNetModule": "tl_lightning.modules",
    "predict_few_shot": "tl_lightning.modules",
    "EpisodicBatchSampler": "tl_lightning.data",
    "FewShotDataModule": "tl_lightning.data",
    "FewShotPredictDataModule": "tl_lightning.data",
    "ImageDataModule": "tl_lightning.data",
    "DigitsDataModule": "tl_lightning.data",
    "ImageFolderDataModule": "tl_lightning.data",
    "SkippedImagesReport": "tl_lightning.callbacks",
    "CSVPredictionWriter": "tl_lightning.callbacks",
    "GradualUnfreezing": "tl_lightning.callbacks",
    "ForgettingMonitor": "tl_lightning.callbacks",
    "WiseFT": "tl_lightning.callbacks",
    "TensorBoardVisuals": "tl_lightning.callbacks",
    "CIFAR10DataModule": "tl_lightning.data",
    "Flowers102DataModule": "tl_lightning.data",
    "CatsDogsDataModule": "tl_lightning.data",
    "OneCycleLR": "tl_lightning.optim",
    "WarmupCosine": "tl_lightning.optim",
    "advise": "tl_lightning.advisor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tl_lightning' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
