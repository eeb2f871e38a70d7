"""Source + target data for domain adaptation: labelled source, target whose labels never train."""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from tl_lightning.data.base import ImageDataModule, ResumableSkipFailedDataLoader
from tl_lightning.data.decode import is_failed, skip_failed_collate
from tl_lightning.data.resumable_sampler import ResumableRandomSampler
from tl_lightning.data.seeded_samples import SeededSamples
from tl_lightning.errors import DataError
from tl_lightning.lightning_compat import own_hyperparameters

PASSED_DOWN = ("backbone", "weights", "image_size", "batch_size")


class ImagesOnly(Dataset):
    """Drops the label of every sample: the target's training images reach the model without labels."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return sample if is_failed(sample) else sample[0]


def _build(spec: dict | ImageDataModule, shared: dict[str, Any], role: str) -> ImageDataModule:
    """A datamodule from ``{"class_path": ..., "init_args": {...}}`` with the shared args passed down."""
    if isinstance(spec, ImageDataModule):
        for key in ("backbone", "weights"):
            if spec.hparams.get(key) != shared[key]:
                raise ValueError(
                    f"{role} datamodule was built with {key}={spec.hparams.get(key)!r} but the domain "
                    f"datamodule has {key}={shared[key]!r}; pass {role} as a class_path/init_args dict "
                    "so the backbone's preprocessing is passed down"
                )
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            f"{role} must be a dict like {{'class_path': 'tl_lightning.data.DigitsDataModule', "
            f"'init_args': {{...}}}}, got {spec!r}"
        )
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{role}.class_path '{spec['class_path']}' cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, ImageDataModule)):
        raise ValueError(
            f"{role}.class_path '{spec['class_path']}' is not an ImageDataModule subclass"
        )
    init_args = dict(spec.get("init_args") or {})
    init_args.update({k: v for k, v in shared.items() if v is not None or k == "weights"})
    with own_hyperparameters():  # not the outer config LightningCLI is instantiating
        return cls(**init_args)


class DomainAdaptationDataModule(LightningDataModule):
    """Pairs a labelled source datamodule with a target datamodule whose labels never train.

    - ``train``: a Lightning ``CombinedLoader`` (mode ``max_size_cycle``, the shorter side
      cycles) yielding ``{"source": (x, y), "target": x}``: target *images only*, labels dropped.
    - ``val``: two loaders, source val (index 0) and target val (index 1). Model selection uses
      **source** validation (``val/acc``); ``val/target_acc`` is a diagnostic only (in a real
      unsupervised problem you would not have it) and must not pick checkpoints.
    - ``test``: the target test split: ``test/acc`` is target-test accuracy.

    ``backbone``, ``weights`` (linked from the model by the CLI), ``image_size`` and ``batch_size``
    are passed down to both datamodules, so preprocessing comes from the backbone; each training
    batch is ``batch_size`` source + ``batch_size`` target images (the paper's half/half).

    Example:
        >>> dm = DomainAdaptationDataModule(
        ...     source={"class_path": "tl_lightning.data.digits_m.DigitsMDataModule",
        ...             "init_args": {"part": "source", "blend": False}},
        ...     target={"class_path": "tl_lightning.data.digits_m.DigitsMDataModule",
        ...             "init_args": {"part": "target"}},
        ...     backbone="dann_cnn", weights=None)
        >>> dm.setup("fit"); batch, _, _ = next(iter(dm.train_dataloader()))
        >>> batch["source"][0].shape, batch["target"].shape
        (torch.Size([64, 3, 28, 28]), torch.Size([64, 3, 28, 28]))
    """

    def __init__(
        self,
        source: dict[str, Any],
        target: dict[str, Any],
        backbone: str = "efficientnet_lite0",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        batch_size: int | None = 64,
    ):
        super().__init__()
        # datamodule instances (Python use) are not plain values: keep them out of the hparams
        self.save_hyperparameters(
            ignore=[
                k for k, v in (("source", source), ("target", target)) if not isinstance(v, dict)
            ]
        )
        shared = {
            "backbone": backbone,
            "weights": weights,
            "image_size": image_size,
            "batch_size": batch_size,
        }
        self.source = _build(source, shared, "source")
        self.target = _build(target, shared, "target")
        for name in ("sampler", "mixup_alpha", "cutmix_alpha"):
            if self.target.hparams.get(name):
                raise ValueError(
                    f"target.{name}={self.target.hparams[name]!r} would use target labels in training; "
                    f"remove it from the target datamodule (set it on the source instead)"
                )
        if [c.lower() for c in self.source.class_names] != [
            c.lower() for c in self.target.class_names
        ]:
            raise DataError(
                f"source classes {self.source.class_names} differ from target classes "
                f"{self.target.class_names}; domain adaptation needs one label space (filter or map them)"
            )

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def class_counts(self) -> list[int]:
        """Source training class counts (for ``class_weights: balanced``; target labels are not used)."""
        return self.source.class_counts()

    def train_labels(self) -> np.ndarray:
        return self.source.train_labels()

    def prepare_data(self) -> None:
        self.source.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for role, side in (("source", self.source), ("target", self.target)):
            side.log_skips_to(self.trainer, role)  # broken images go to this run's skip log
            side.setup(stage)

    def train_dataloader(self) -> CombinedLoader:
        target = self.target
        if target.train_set is None:
            raise RuntimeError(
                "DomainAdaptationDataModule has no target train split; call setup() first"
            )
        target.route_skips(target.train_set, "train")
        seed = target.hparams.seed + 1  # an order of its own, not the source's permutation
        # resumable mid-epoch and augmented per (seed, epoch, index), like the source loader
        target_loader = ResumableSkipFailedDataLoader(
            SeededSamples(ImagesOnly(target.train_set), seed),
            collate_fn=skip_failed_collate,
            batch_size=target.batch_size,
            sampler=ResumableRandomSampler(len(target.train_set), seed=seed, keyed=True),
            seed=seed,
            num_workers=target.num_workers,
            persistent_workers=target.num_workers > 0,
            drop_last=len(target.train_set) > target.batch_size,
        )
        loaders = {"source": self.source.train_dataloader(), "target": target_loader}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        return [self.source.val_dataloader(), self.target.val_dataloader()]

    def test_dataloader(self) -> DataLoader:
        return self.target.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.target.predict_dataloader()
