"""LightningDataModules and the datasets behind them."""

from tl_lightning.data.base import ImageDataModule
from tl_lightning.data.cats_dogs import CatsDogsDataModule, CatsDogsSource
from tl_lightning.data.cifar10 import CIFAR10DataModule, CIFAR10Source
from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.dataset import ImageDataset
from tl_lightning.data.digits import DigitsDataModule, DigitsSource
from tl_lightning.data.digits_m import DigitsMDataModule, DigitsMSource
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.data.episodes import EpisodicBatchSampler
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.data.few_shot_predict import FewShotPredictDataModule
from tl_lightning.data.flowers102 import Flowers102DataModule, Flowers102Source
from tl_lightning.data.image_folder import ImageFolderDataModule, ImageFolderSource
from tl_lightning.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler
from tl_lightning.data.source import ImageSource, LabelledImages
from tl_lightning.data.split import stratified_split

__all__ = [
    "CIFAR10DataModule",
    "CIFAR10Source",
    "CatsDogsSource",
    "ClassificationDataModule",
    "DigitsMSource",
    "DigitsSource",
    "ImageFolderSource",
    "ImageSource",
    "CatsDogsDataModule",
    "DigitsDataModule",
    "DigitsMDataModule",
    "DomainAdaptationDataModule",
    "EpisodicBatchSampler",
    "FewShotDataModule",
    "FewShotPredictDataModule",
    "Flowers102DataModule",
    "Flowers102Source",
    "ImageDataModule",
    "ImageDataset",
    "ImageFolderDataModule",
    "LabelledImages",
    "ResumableDataLoader",
    "ResumableRandomSampler",
    "stratified_split",
]
