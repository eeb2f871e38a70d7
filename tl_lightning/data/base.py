"""The shared LightningDataModule: preprocessing from the backbone, splits, loaders, imbalance."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tl_lightning.backbones import DataConfig, resolve_data_config
from tl_lightning.config_checks import check_model_and_data
from tl_lightning.data.decode import (
    SKIP_LOG_NAME,
    SkipFailedDataLoader,
    skip_failed_collate,
)
from tl_lightning.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler
from tl_lightning.data.seeded_samples import SeededSamples
from tl_lightning.data.source import LabelledImages
from tl_lightning.data.transforms import (
    AUGMENT_PRESETS,
    batch_mixer,
    eval_transform,
    train_transform,
)

SAMPLERS = (None, "weighted")
_STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class ResumableSkipFailedDataLoader(SkipFailedDataLoader, ResumableDataLoader):
    """Train loader: resumable mid-epoch, and never yields an empty batch.

    SkipFailedDataLoader comes first: its ``__iter__`` is a generator, so ResumableDataLoader's
    ``__iter__`` (which consumes the pending skip) must run inside it, when iteration starts.
    """


class MixBatch:
    """MixUp/CutMix a collated ``(images, labels)`` batch (the train loader seeds each call)."""

    def __init__(self, mixer):
        self.mixer = mixer

    def __call__(self, batch):
        return self.mixer(*batch)


def skip_log_path(trainer) -> Path | None:
    """The run's skip log: ``skipped_images.csv`` in the trainer's log dir (None without one)."""
    if trainer is None:
        return None
    folder = trainer.log_dir or trainer.default_root_dir
    return Path(folder) / SKIP_LOG_NAME if folder else None


class ImageDataModule(LightningDataModule):
    """Base of every tl-lightning datamodule.

    Preprocessing (mean, std, size, interpolation, crop) comes from the backbone named by
    ``backbone``/``weights``; under the CLI these are linked from the model so they cannot disagree.

    Args:
        backbone, weights: the backbone whose preprocessing to use.
        image_size: override the backbone's input size (low-resolution runs).
        augment: train augmentation preset: ``none``, ``basic`` or ``strong``.
        mixup_alpha, cutmix_alpha: batch-level MixUp / CutMix (soft targets) when > 0.
        batch_size, num_workers: loader settings; ``num_workers=None`` picks a sensible default.
        sampler: ``weighted`` draws training samples inversely to class frequency.
        seed: seeds the splits.
        predict_dir: folder of images for ``predict``.

    Subclasses fill ``train_set``, ``val_set``, ``test_set`` in :meth:`setup` and implement
    :attr:`class_names` and :meth:`train_labels`.
    """

    default_workers = 4  # loaders decoding files; in-memory datasets override with 0

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        augment: str = "none",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        batch_size: int = 64,
        num_workers: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        predict_dir: str | None = None,
    ):
        super().__init__()
        if augment not in AUGMENT_PRESETS:
            raise ValueError(f"unknown augment preset '{augment}'; valid: {list(AUGMENT_PRESETS)}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}'; valid: {list(SAMPLERS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.data_config: DataConfig = resolve_data_config(backbone, weights)
        self.image_size = image_size or self.data_config.input_size
        if self.data_config.fixed_input_size and self.image_size != self.data_config.input_size:
            raise ValueError(
                f"backbone '{backbone}' only takes {self.data_config.input_size}px input; "
                f"image_size={image_size} cannot work (remove image_size or pick another backbone)"
            )
        self.batch_size = batch_size
        workers = self.default_workers if num_workers is None else num_workers
        self.num_workers = min(workers, os.cpu_count() or 1)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._checked_models: set[tuple[int, bool]] = set()  # (model id, predict?)
        # split -> (images, the features that replaced them): see use_frozen_features()
        self._image_sets: dict[str, Dataset] = {}
        self._features: dict[str, Dataset] = {}

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_labels(self) -> np.ndarray:
        """Labels of the training split (for class counts and the weighted sampler)."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------
    def class_counts(self) -> list[int]:
        return np.bincount(self.train_labels(), minlength=self.num_classes).tolist()

    def train_transform(self, resize: bool = True, hflip: bool = True, augment: str | None = None):
        augment = self.hparams.augment if augment is None else augment
        return train_transform(self.data_config, self.image_size, augment, hflip, resize)

    def eval_transform(self, resize: bool = True):
        return eval_transform(self.data_config, self.image_size, resize)

    def transforms_for(self, images: LabelledImages, augment: str | None = None) -> tuple:
        """``(train, eval)`` transforms for a source's images (``augment``: the datamodule's
        preset unless given).

        Photos in files: the backbone's resize + crop recipe. Small in-memory images
        (``whole_image``): used as they are when already at ``image_size``, otherwise resized
        whole (no center crop); training crops keep 60-100 % of them, and ``augment: none``
        trains on the eval pipeline.
        """
        augment = self.hparams.augment if augment is None else augment
        if not images.whole_image:
            return self.train_transform(hflip=images.hflip, augment=augment), self.eval_transform()
        if images.items.shape[-1] == self.image_size:  # already sized: skip two no-op ops
            eval_tf = self.eval_transform(resize=False)
        else:  # a crop_pct crop would throw away 1/8 of a 32 px object
            whole = dataclasses.replace(self.data_config, crop_pct=1.0)
            eval_tf = eval_transform(whole, self.image_size)
        if augment == "none":
            return eval_tf, eval_tf
        return self.train_transform(resize=False, hflip=images.hflip, augment=augment), eval_tf

    def _pin_memory(self) -> bool:
        """Pinned host memory only speeds up copies to a GPU: on when the trainer runs on CUDA."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def check_model(self, stage: str) -> None:
        """Once per attached model (and once more for predict): its classes and input size fit.

        The module's ``setup`` calls it before any image is read (feature caching included);
        each loader calls it too, for modules that do not.
        """
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        key = (id(model), stage == "predict")  # predict skips the class check: one more check
        if model is None or key in self._checked_models:
            return
        self._checked_models.add(key)
        check_model_and_data(model, self, stage)

    def use_frozen_features(
        self, stage: str, embed: Callable[[Dataset, str], Dataset] | None = None
    ) -> bool:
        """The one hook a model with a frozen, deterministic backbone calls (from its ``setup``).

        The datamodule owns its datasets and decides: when its train pipeline is deterministic
        (``augment: none``, no MixUp/CutMix), each split ``stage`` uses is replaced by
        ``embed(dataset, split)`` (for :class:`~tl_lightning.modules.FeatureExtractionModule`: the
        features cached once on disk) and ``True`` is returned. The image datasets stay
        available from :meth:`image_dataset` (for pictures of the data).

        Example:
            >>> dm.use_frozen_features("fit", lambda dataset, split: cache(dataset))  # doctest: +SKIP
            True
        """
        if embed is None or not self.deterministic_train():
            return False
        for split in _STAGE_SPLITS.get(stage, ()):
            dataset = getattr(self, f"{split}_set")
            if dataset is not None and dataset is not self._features.get(split):
                self._image_sets[split] = dataset
                self._features[split] = embed(dataset, split)
                setattr(self, f"{split}_set", self._features[split])
        return True

    def serve_images(self) -> None:
        """Undo :meth:`use_frozen_features`: every split serves its images again."""
        for split, images in self._image_sets.items():
            if getattr(self, f"{split}_set") is self._features.get(split):
                setattr(self, f"{split}_set", images)
        self._image_sets.clear()
        self._features.clear()

    def deterministic_train(self) -> bool:
        """True when a training image maps to the same input every epoch (features can be cached)."""
        hp = self.hparams
        return (
            hp.get("augment", "none") == "none"
            and not hp.get("mixup_alpha")
            and not hp.get("cutmix_alpha")
        )

    def image_dataset(self, split: str) -> Dataset | None:
        """The image dataset of ``split`` (``train``, ``val``, ``test``), even once its features
        are served instead."""
        current = getattr(self, f"{split}_set", None)
        return self._image_sets[split] if current is self._features.get(split) else current

    def val_image_sets(self) -> list[tuple[str, Dataset]]:
        """``[(name, image dataset)]`` of validation, for pictures of the data (``val``; a
        domain pair names its ``source`` and ``target`` sets)."""
        images = self.image_dataset("val")
        return [("val", images)] if images is not None else []

    def route_skips(self, dataset: Dataset, split: str) -> None:
        """Images of ``dataset`` that fail to load go to the run's skip log, marked ``split``."""
        if hasattr(dataset, "skip_log"):
            log_path = skip_log_path(getattr(self, "trainer", None))
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            dataset.skip_log = str(log_path) if log_path else None
            dataset.split = split

    def _loader(
        self,
        dataset: Dataset | None,
        name: str,
        train: bool = False,
        loader_class: type[DataLoader] = SkipFailedDataLoader,
        **kwargs,
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {name} split; call setup() first")
        self.check_model(name)
        self.route_skips(dataset, name)
        kwargs.setdefault("collate_fn", skip_failed_collate)
        if getattr(kwargs.get("sampler"), "keyed", False):  # augmentation seeded per sample
            dataset = SeededSamples(dataset, self.hparams.seed)
        workers = kwargs.pop("num_workers", self.num_workers)
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            # keep workers between epochs: no re-spawn (and dataset re-pickle) each epoch
            persistent_workers=workers > 0,
            pin_memory=self._pin_memory(),
            drop_last=train and len(dataset) > self.batch_size,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._train_loader()

    def _train_loader(self, name: str = "train", **kwargs) -> DataLoader:
        """The training loader of ``train_set`` (its skipped images logged as ``name``)."""
        mixer = batch_mixer(self.hparams.mixup_alpha, self.hparams.cutmix_alpha, self.num_classes)
        if mixer:  # mixed in the main process per (seed, epoch, batch index): see ResumableDataLoader
            kwargs["batch_transform"] = MixBatch(mixer)
        if self.train_set is not None:
            weights = None
            if self.hparams.sampler == "weighted":
                labels = self.train_labels()
                per_class = 1.0 / np.maximum(np.bincount(labels, minlength=self.num_classes), 1)
                weights = per_class[labels].tolist()
            size = len(weights) if weights is not None else len(self.train_set)
            # the order depends on (seed, epoch) only, and the loader saves its position:
            # a run killed mid-epoch resumes on the very next batch
            kwargs["sampler"] = ResumableRandomSampler(
                size, seed=self.hparams.seed, weights=weights, keyed=True
            )
            kwargs["seed"] = self.hparams.seed
        return self._loader(
            self.train_set,
            name,
            train=True,
            loader_class=ResumableSkipFailedDataLoader,
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        from tl_lightning.data.dataset import ImageFilesDataset

        if not self.hparams.predict_dir:
            raise ValueError(
                "predict needs data.predict_dir: a folder of images (e.g. --data.predict_dir my_images/)"
            )
        dataset = ImageFilesDataset(self.hparams.predict_dir, self.eval_transform())
        return self._loader(dataset, "predict", collate_fn=skip_failed_collate)
