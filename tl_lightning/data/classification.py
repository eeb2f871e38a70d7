"""The one classification datamodule: train/val/test datasets of one source's splits."""

from __future__ import annotations

import inspect

import numpy as np

from tl_lightning.data.base import ImageDataModule
from tl_lightning.data.source import ImageSource, LabelledImages

_SETUP_SPLITS = {None: ("train", "val", "test"), "fit": ("train", "val"),
                 "validate": ("train", "val"), "test": ("test",)}  # fmt: skip


class ClassificationDataModule(ImageDataModule):
    """Classify the images of one :class:`~tl_lightning.data.source.ImageSource`.

    The source loads the images once (``load(image_size)``) and gives the indices of the
    ``train``, ``val`` and ``test`` splits (``splits(images, seed)``); this datamodule owns the
    three datasets built from them. The per-dataset datamodules (``DigitsDataModule``,
    ``CIFAR10DataModule``, ``Flowers102DataModule``, ``CatsDogsDataModule``,
    ``ImageFolderDataModule``, ...) are this class with their source built from their own
    arguments; any source also works directly, in Python or in YAML::

        data:
          class_path: tl_lightning.data.classification.ClassificationDataModule
          init_args:
            source:
              class_path: tl_lightning.data.image_folder.ImageFolderSource
              init_args: {root: my_images, val_fraction: 0.2}

    Args:
        source: the images and their splits.
        backbone, weights, image_size, augment, mixup_alpha, cutmix_alpha, batch_size,
            num_workers, sampler, seed, predict_dir: as in
            :class:`~tl_lightning.data.base.ImageDataModule`.

    Example:
        >>> from tl_lightning.data.digits import DigitsSource
        >>> dm = ClassificationDataModule(DigitsSource(), backbone="resnet18", weights=None,
        ...                               image_size=32, num_workers=0)
        >>> dm.setup("fit"); len(dm.train_set), len(dm.val_set), dm.num_classes
        (1078, 362, 10)
    """

    def __init__(self, source: ImageSource, *args, **kwargs):
        if not isinstance(source, ImageSource):
            raise ValueError(
                f"source must be an ImageSource such as tl_lightning.data.image_folder."
                f"ImageFolderSource (in YAML: class_path + init_args), got {type(source).__name__}"
            )
        super().__init__(*args, **kwargs)  # ImageDataModule's arguments, as the CLI shows them
        if "source" in inspect.signature(type(self).__init__).parameters:
            # the source as plain values: a checkpoint's hparams must load with weights_only=True
            self.save_hyperparameters({**self.hparams, "source": source.config()})
        else:  # a dataset's own datamodule: its arguments rebuild its source
            self.save_hyperparameters(ignore="source")
        self.source = source
        self._images: LabelledImages | None = None
        self._splits: dict[str, np.ndarray] | None = None

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    def prepare_data(self) -> None:
        self.source.prepare()

    def load_images(self) -> LabelledImages:
        """The source's images at ``image_size`` (loaded once)."""
        if self._images is None:
            self._images = self.source.load(self.image_size)
        return self._images

    def split_indices(self, split: str) -> np.ndarray:
        """Indices into :meth:`load_images` of ``split`` (``train``, ``val`` or ``test``): the
        source's splits, seeded by ``seed``, computed once."""
        if self._splits is None:
            self._splits = self.source.splits(self.load_images(), self.hparams.seed)
        return self._splits[split]

    def train_labels(self) -> np.ndarray:
        return self.load_images().labels[self.split_indices("train")]

    def setup(self, stage: str | None = None) -> None:
        """Build the dataset of every split the source gives; the splits ``stage`` needs
        (``fit``: train and val, ``test``: test, ``None``: all) are checked by the source first."""
        images = self.load_images()
        train_tf, eval_tf = self.transforms_for(images)
        for split in ("train", "val", "test"):
            indices = self.split_indices(split)
            if split in _SETUP_SPLITS.get(stage, ()):
                self.source.check_split(split, indices)
            elif not len(indices):
                continue
            dataset = images.dataset(indices, train_tf if split == "train" else eval_tf)
            setattr(self, f"{split}_set", dataset)
