"""LightningDataModules and the datasets behind them."""

from tl_lightning.data.base import ImageDataModule, stratified_split
from tl_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule", "ImageDataModule", "stratified_split"]
