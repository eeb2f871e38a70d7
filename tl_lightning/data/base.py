"""The shared LightningDataModule: preprocessing from the backbone, splits, loaders, imbalance."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, default_collate

from tl_lightning.backbones import DataConfig, resolve_data_config
from tl_lightning.config_checks import check_model_and_data
from tl_lightning.data.folder import (
    SKIP_LOG_NAME,
    SkipFailedDataLoader,
    is_failed,
    skip_failed_collate,
)
from tl_lightning.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler
from tl_lightning.data.seeded_samples import SeededSamples
from tl_lightning.data.transforms import (
    AUGMENT_PRESETS,
    batch_mixer,
    eval_transform,
    train_transform,
)

SAMPLERS = (None, "weighted")


def _allocate(n: int, fractions: np.ndarray, min_one: bool) -> np.ndarray:
    """Split ``n`` items by ``fractions``: largest-remainder rounding (each part within 1 of
    ``n * fraction``), then, with ``min_one``, every part with a positive fraction gets >= 1."""
    target = n * fractions
    counts = np.floor(target).astype(np.int64)
    order = np.argsort(-(target - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    if min_one:
        for j in np.flatnonzero((counts == 0) & (fractions > 0)):
            # take one from the most over-allocated part that can spare it
            donor = int(np.argmax(np.where(counts > 1, counts - target, -np.inf)))
            counts[donor] -= 1
            counts[j] += 1
    return counts


class ResumableSkipFailedDataLoader(SkipFailedDataLoader, ResumableDataLoader):
    """Train loader: resumable mid-epoch, and never yields an empty batch.

    SkipFailedDataLoader comes first: its ``__iter__`` is a generator, so ResumableDataLoader's
    ``__iter__`` (which consumes the pending skip) must run inside it, when iteration starts.
    """


def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into len(fractions) parts with the same class proportions in each, seeded.

    Per class, the part sizes are ``n_class * fraction`` rounded by largest remainder (within 1),
    except that a class with at least as many samples as there are (non-empty) parts appears in
    every part. The parts are disjoint, cover all indices, and depend only on ``labels``,
    ``fractions`` and ``seed``. Works for any class size (no minimum, unlike sklearn's).
    """
    fracs = np.asarray(fractions, dtype=np.float64)
    if fracs.ndim != 1 or len(fracs) == 0 or (fracs < 0).any() or not np.isclose(fracs.sum(), 1.0):
        raise ValueError(
            f"split fractions must be >= 0 and sum to 1, got {list(fractions)} (e.g. [0.8, 0.1, 0.1])"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n_parts = int((fracs > 0).sum())
    chunks: list[list[np.ndarray]] = [[] for _ in fracs]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        counts = _allocate(len(members), fracs, min_one=len(members) >= n_parts)
        for part, chunk in zip(chunks, np.split(members, np.cumsum(counts)[:-1]), strict=True):
            part.append(chunk)
    return [
        np.sort(np.concatenate(c)).astype(np.int64) if c else np.zeros(0, np.int64) for c in chunks
    ]


def carve_val(
    labels: Sequence[int], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train_indices, val_indices)`` for datasets without a validation split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = stratified_split(labels, (1.0 - val_fraction, val_fraction), seed)
    return train, val


class MixCollate:
    """Collate the samples that loaded, then MixUp/CutMix the batch (a class: workers pickle it)."""

    def __init__(self, mixer):
        self.mixer = mixer

    def __call__(self, samples):
        good = [s for s in samples if not is_failed(s)]
        return self.mixer(*default_collate(good)) if good else []


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

    def train_transform(self, resize: bool = True, hflip: bool = True):
        return train_transform(
            self.data_config, self.image_size, self.hparams.augment, hflip, resize
        )

    def eval_transform(self, resize: bool = True):
        return eval_transform(self.data_config, self.image_size, resize)

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
        if hasattr(dataset, "skip_log"):  # decode failures go to the run's skip log, by split
            log_path = skip_log_path(getattr(self, "trainer", None))
            if log_path is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
            dataset.skip_log = str(log_path) if log_path else None
            dataset.split = name
        kwargs.setdefault("collate_fn", skip_failed_collate)
        if getattr(kwargs.get("sampler"), "keyed", False):  # augmentation seeded per sample
            dataset = SeededSamples(dataset, self.hparams.seed)
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            # keep workers between epochs: no re-spawn (and dataset re-pickle) each epoch
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
            drop_last=train and len(dataset) > self.batch_size,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        mixer = batch_mixer(self.hparams.mixup_alpha, self.hparams.cutmix_alpha, self.num_classes)
        kwargs: dict = {"collate_fn": MixCollate(mixer)} if mixer else {}
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
            "train",
            train=True,
            loader_class=ResumableSkipFailedDataLoader,
            **kwargs,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test")

    def predict_dataloader(self) -> DataLoader:
        from tl_lightning.data.folder import ImageFilesDataset

        if not self.hparams.predict_dir:
            raise ValueError(
                "predict needs data.predict_dir: a folder of images (e.g. --data.predict_dir my_images/)"
            )
        dataset = ImageFilesDataset(self.hparams.predict_dir, self.eval_transform())
        return self._loader(dataset, "predict", collate_fn=skip_failed_collate)
