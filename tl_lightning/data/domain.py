"""Source + target data for domain adaptation: labelled source, target whose labels never train."""

from __future__ import annotations

import os

import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from tl_lightning.data.base import ImageDataModule, ResumableSkipFailedDataLoader
from tl_lightning.data.decode import is_failed, skip_failed_collate
from tl_lightning.data.resumable_sampler import ResumableRandomSampler
from tl_lightning.data.seeded_samples import SeededSamples
from tl_lightning.data.source import ImageSource, LabelledImages
from tl_lightning.data.transforms import AUGMENT_PRESETS
from tl_lightning.errors import DataError

SIDES = ("source", "target")
_FILE_WORKERS = 4  # loaders decoding image files; in-memory images load in the main process


class ImagesOnly(Dataset):
    """Drops the label of every sample: the target's training images reach the model without labels."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return sample if is_failed(sample) else sample[0]


class DomainAdaptationDataModule(ImageDataModule):
    """A labelled source and a target whose labels never train, composed from two sources.

    ``source`` and ``target`` are :class:`~tl_lightning.data.source.ImageSource` recipes
    (``DigitsMSource``, ``CIFAR10Source``, ``CatsDogsSource``, ``ImageFolderSource``, ...): this
    datamodule loads both, splits each (seeded by ``seed``) and owns all six datasets.

    - ``train``: a Lightning ``CombinedLoader`` (mode ``max_size_cycle``, the shorter side
      cycles) yielding ``{"source": (x, y), "target": x}``: target *images only*, labels dropped.
      ``sampler``, ``mixup_alpha`` and ``cutmix_alpha`` act on the source (they use labels).
    - ``val``: two loaders, source val (index 0) and target val (index 1). Model selection uses
      **source** validation (``val/acc``); ``val/target_acc`` is a diagnostic only (in a real
      unsupervised problem you would not have it) and must not pick checkpoints.
    - ``test``: the target test split: ``test/acc`` is target-test accuracy.

    Preprocessing comes from ``backbone``/``weights`` (linked from the model by the CLI) at one
    ``image_size`` for both domains; each training batch is ``batch_size`` source +
    ``batch_size`` target images (the paper's half/half). ``augment`` applies to both domains
    unless ``target_augment`` is given. Images that fail to load are skipped and logged in the
    run's ``skipped_images.csv`` as ``source_train``, ``target_val``, ...

    Example:
        >>> from tl_lightning.data.digits_m import DigitsMSource
        >>> dm = DomainAdaptationDataModule(
        ...     source=DigitsMSource(part="source", blend=False),
        ...     target=DigitsMSource(part="target"),
        ...     backbone="dann_cnn", weights=None, image_size=28)
        >>> dm.setup("fit"); batch, _, _ = next(iter(dm.train_dataloader()))
        >>> batch["source"][0].shape, batch["target"].shape
        (torch.Size([64, 3, 28, 28]), torch.Size([64, 3, 28, 28]))
    """

    def __init__(
        self,
        source: ImageSource,
        target: ImageSource,
        *args,
        target_augment: str | None = None,
        **kwargs,
    ):
        for role, side in (("source", source), ("target", target)):
            if not isinstance(side, ImageSource):
                raise ValueError(
                    f"{role} must be an ImageSource such as tl_lightning.data.digits_m.DigitsMSource "
                    f"(in YAML: class_path + init_args), got {type(side).__name__}"
                )
        if target_augment is not None and target_augment not in AUGMENT_PRESETS:
            raise ValueError(
                f"unknown target_augment preset '{target_augment}'; valid: {list(AUGMENT_PRESETS)}"
            )
        super().__init__(*args, **kwargs)  # ImageDataModule's arguments, as the CLI shows them
        # the sources as plain values: a checkpoint's hparams must load with weights_only=True
        self.save_hyperparameters(
            {**self.hparams, "source": source.config(), "target": target.config()}
        )
        self.sources = {"source": source, "target": target}
        if [c.lower() for c in source.class_names] != [c.lower() for c in target.class_names]:
            raise DataError(
                f"source classes {source.class_names} differ from target classes "
                f"{target.class_names}; domain adaptation needs one label space (filter or map them)"
            )
        self.sets: dict[str, dict[str, Dataset]] = {"source": {}, "target": {}}
        self._images: dict[str, LabelledImages] = {}
        self._splits: dict[str, dict[str, np.ndarray]] = {}

    @property
    def class_names(self) -> list[str]:
        return self.sources["source"].class_names

    def train_labels(self) -> np.ndarray:
        """Source training labels (class counts, the weighted sampler; target labels are not used)."""
        return self._side("source")[0].labels[self._side("source")[1]["train"]]

    def prepare_data(self) -> None:
        for source in self.sources.values():
            source.prepare()

    def _side(self, role: str) -> tuple[LabelledImages, dict[str, np.ndarray]]:
        """One side's images (loaded once) and the indices of its splits."""
        if role not in self._images:
            images = self.sources[role].load(self.image_size)
            self._images[role] = images
            self._splits[role] = self.sources[role].splits(images, self.hparams.seed)
        return self._images[role], self._splits[role]

    def workers(self, role: str) -> int:
        """Loader workers of one side: ``num_workers``, else 0 for in-memory images and 4 for files."""
        given = self.hparams.num_workers
        in_memory = isinstance(self._side(role)[0].items, torch.Tensor)
        workers = given if given is not None else (0 if in_memory else _FILE_WORKERS)
        return min(workers, os.cpu_count() or 1)

    def setup(self, stage: str | None = None) -> None:
        augment = {"source": self.hparams.augment, "target": self.hparams.target_augment}
        for role in SIDES:
            images, splits = self._side(role)
            train_tf, eval_tf = self.transforms_for(images, augment[role])
            tfs = {"train": train_tf, "val": eval_tf, "test": eval_tf}
            for split, indices in splits.items():
                if len(indices) and split not in self.sets[role]:
                    self.sets[role][split] = images.dataset(indices, tfs[split])
        self.train_set = self.sets["source"].get("train")
        self.val_set = self.sets["source"].get("val")
        self.test_set = self.sets["target"].get("test")
        self.num_workers = self.workers("source")  # the base class's loaders are the source's

    def val_image_sets(self) -> list[tuple[str, Dataset]]:
        return [(role, self.sets[role]["val"]) for role in SIDES if "val" in self.sets[role]]

    def _target(self, split: str) -> Dataset:
        dataset = self.sets["target"].get(split)
        if dataset is None:
            raise RuntimeError(
                f"DomainAdaptationDataModule has no target {split} split; call setup() first "
                "(or give the target source a test_fraction > 0)"
            )
        return dataset

    def train_dataloader(self) -> CombinedLoader:
        target = self._target("train")
        self.route_skips(target, "target_train")
        seed = self.hparams.seed + 1  # an order of its own, not the source's permutation
        workers = self.workers("target")
        # resumable mid-epoch and augmented per (seed, epoch, index), like the source loader
        target_loader = ResumableSkipFailedDataLoader(
            SeededSamples(ImagesOnly(target), seed),
            collate_fn=skip_failed_collate,
            batch_size=self.batch_size,
            sampler=ResumableRandomSampler(len(target), seed=seed, keyed=True),
            seed=seed,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=len(target) > self.batch_size,
        )
        loaders = {"source": self._train_loader("source_train"), "target": target_loader}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(self.val_set, "source_val"),
            self._loader(self._target("val"), "target_val", num_workers=self.workers("target")),
        ]

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._target("test"), "target_test", num_workers=self.workers("target"))
