"""Few-shot prediction data: a labelled support folder (``<class>/*.jpg``) and a folder of queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from tl_lightning.backbones import DataConfig
from tl_lightning.backbones import conv4 as _conv4  # noqa: F401  (registers the default backbone)
from tl_lightning.data.base import ImageDataModule
from tl_lightning.data.dataset import ImageDataset, ImageFilesDataset
from tl_lightning.data.decode import skip_failed_collate
from tl_lightning.data.listing import list_images
from tl_lightning.errors import DataError


class FewShotPredictDataModule(ImageDataModule):
    """Classify the images under ``query_dir`` into the classes of ``support_dir/<class>/``.

    The support folder holds a few labelled images per class (the "shots"); a ProtoNet model
    turns them into prototypes at ``predict`` start, then labels every query image. Class
    names are the support sub-folder names; ``num_classes`` is their number (the CLI links both
    to the model). Preprocessing is the backbone's eval transform.

    Example:
        >>> dm = FewShotPredictDataModule("support/", "queries/", backbone="efficientnet_lite0")
        >>> dm.class_names
        ['cat', 'dog']

    From the command line (a frozen pretrained backbone needs no training or checkpoint)::

        tl-lightning predict --model tl_lightning.modules.protonet.ProtoNetModule \\
            --model.backbone efficientnet_lite0 --model.freeze_backbone true \\
            --data tl_lightning.data.few_shot_predict.FewShotPredictDataModule \\
            --data.support_dir support/ --data.query_dir queries/
    """

    default_workers = 2

    def __init__(
        self,
        support_dir: str,
        query_dir: str,
        backbone: str = "conv4",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
    ):
        super().__init__(
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        self.save_hyperparameters()
        self.support_dir, self.query_dir = Path(support_dir), Path(query_dir)
        if not self.support_dir.is_dir():
            raise FileNotFoundError(
                f"support folder '{self.support_dir}' does not exist (expected <class>/*.jpg inside)"
            )
        if not self.query_dir.is_dir():
            raise FileNotFoundError(f"query folder '{self.query_dir}' does not exist")
        self._names = sorted(p.name for p in self.support_dir.iterdir() if p.is_dir())
        if len(self._names) < 2:
            raise DataError(
                f"support folder '{self.support_dir}' needs >= 2 class sub-folders (<class>/*.jpg), found {self._names}"
            )

    def use_data_config(self, data_config: DataConfig, image_size: int | None = None) -> None:
        """Preprocess like ``data_config`` (for a backbone object built outside the registry)."""
        self.data_config = data_config
        self.image_size = image_size or data_config.input_size

    @property
    def class_names(self) -> list[str]:
        """The support sub-folder names, sorted: the classes queries are assigned to."""
        return list(self._names)

    def train_labels(self) -> np.ndarray:
        return self.support_dataset().labels

    def support_dataset(self) -> ImageDataset:
        """Every support image with its class index (unreadable support images are an error)."""
        files, labels = [], []
        for i, name in enumerate(self._names):
            found = list_images(self.support_dir / name)
            if not found:
                raise DataError(f"support class folder '{self.support_dir / name}' holds no images")
            files += found
            labels += [i] * len(found)
        return ImageDataset(files, np.asarray(labels, dtype=np.int64), self.eval_transform())

    def support_dataloader(self) -> DataLoader:
        return DataLoader(
            self.support_dataset(),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=skip_failed_collate,  # a broken support image is skipped and reported
        )

    def setup(self, stage: str | None = None) -> None:
        if stage not in (None, "predict"):
            raise ValueError(
                f"FewShotPredictDataModule only predicts; got stage '{stage}' (train with FewShotDataModule)"
            )

    def predict_dataloader(self) -> DataLoader:
        dataset = ImageFilesDataset(self.query_dir, self.eval_transform())
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=skip_failed_collate,
            pin_memory=torch.cuda.is_available(),
        )
