"""N-way K-shot episodes: a seeded, DDP-correct episode sampler and a class-split datamodule.

An *episode* is a tiny classification task: ``way`` classes drawn from one class split, ``shot``
labelled support images and ``query`` images to classify per class. Few-shot methods train
and are evaluated on episodes whose classes they have never seen in training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, default_collate

from tl_lightning.backbones import conv4 as _conv4  # noqa: F401  (registers the default backbone)
from tl_lightning.data.base import ImageDataModule, stratified_split
from tl_lightning.data.cifar10 import CIFAR10_CLASSES
from tl_lightning.data.digits import TensorImageDataset, load_digits_images
from tl_lightning.data.folder import list_images, load_rgb
from tl_lightning.data.resumable_sampler import ResumableDataLoader
from tl_lightning.errors import DataError

log = logging.getLogger(__name__)

DATASETS = ("digits", "cifar10", "flowers102", "folder")


class EpisodicBatchSampler(BatchSampler):
    """Yields episodes as index lists: ``way`` classes x (``shot`` support + ``query`` query) samples.

    Layout of each list: the ``way * shot`` support indices (class by class), then the
    ``way * query`` query indices (class by class); all distinct. Episode ``i`` of epoch ``e`` is
    drawn from its own RNG seeded by ``(seed, e, i)``, so episodes are reproducible and do not
    depend on the number of processes. Under DDP rank ``r`` of ``W`` takes episodes
    ``r, r + W, ...``: ranks get different episodes, every rank the same number (``episodes`` is
    rounded up to a multiple of ``W`` with fresh episodes, never repeats), and the union over ranks
    is exactly what a single process draws.

    Rank and world size come from, in order: the ``rank``/``world_size`` arguments; the
    ``DistributedSampler`` that Lightning injects as ``sampler`` when
    ``Trainer(use_distributed_sampler=True)`` (the default; its indices are ignored, only its
    rank is used); ``torch.distributed`` when initialised (``use_distributed_sampler=False``).
    ``reseed_each_epoch=False`` keeps the same episodes every epoch (validation, test).
    ``episodes_per_batch > 1`` yields that many of this rank's episodes as one flat list (one
    loader step), for evaluation on cached embeddings; the episodes themselves do not change.

    Example:
        >>> sampler = EpisodicBatchSampler(labels, way=5, shot=1, query=15, episodes=600, seed=0)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)   # 5 x 16 images per batch
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        way: int,
        shot: int,
        query: int,
        episodes: int,
        seed: int = 0,
        reseed_each_epoch: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        sampler: object | None = None,
        episodes_per_batch: int = 1,
    ):
        # No super().__init__: BatchSampler's arguments (sampler, batch_size) do not apply here.
        labels = np.asarray(
            labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64
        )
        for name, value in (
            ("way", way),
            ("shot", shot),
            ("episodes", episodes),
            ("episodes_per_batch", episodes_per_batch),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if query < 0:
            raise ValueError(f"query must be >= 0, got {query}")
        self.labels = labels
        self.way, self.shot, self.query, self.episodes = way, shot, query, episodes
        self.seed, self.reseed_each_epoch = seed, reseed_each_epoch
        self.episodes_per_batch = episodes_per_batch
        self.sampler = sampler
        self._rank, self._world_size = rank, world_size
        self.epoch = 0
        self.classes = np.unique(labels)
        self._by_class = {int(c): np.flatnonzero(labels == c) for c in self.classes}
        if len(self.classes) < way:
            raise ValueError(
                f"{way}-way episodes need >= {way} classes but the split has {len(self.classes)} "
                f"({self.classes.tolist()}); lower way or give the split more classes"
            )
        need = shot + query
        small = {c: len(i) for c, i in self._by_class.items() if len(i) < need}
        if small:
            raise ValueError(
                f"classes {small} (class: samples) have fewer than shot + query = {need} samples; "
                f"lower shot/query or leave those classes out of the split"
            )

    def replicas(self) -> tuple[int, int]:
        """``(rank, world_size)`` this sampler draws for (see the class docstring for the order)."""
        if self._rank is not None or self._world_size is not None:
            return self._rank or 0, self._world_size or 1
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.rank, self.sampler.num_replicas
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning every epoch: training draws new episodes each epoch."""
        self.epoch = epoch

    def episodes_per_rank(self) -> int:
        _, world = self.replicas()
        return -(-self.episodes // world)  # ceil: every rank runs the same number of episodes

    def __len__(self) -> int:
        return -(-self.episodes_per_rank() // self.episodes_per_batch)

    def episode(self, index: int) -> list[int]:
        """The indices of global episode ``index`` of the current epoch (support, then query)."""
        epoch = self.epoch if self.reseed_each_epoch else 0
        rng = np.random.default_rng([self.seed, epoch, index])
        classes = rng.choice(self.classes, size=self.way, replace=False)
        picks = [
            rng.choice(self._by_class[int(c)], size=self.shot + self.query, replace=False)
            for c in classes
        ]
        support = [int(i) for p in picks for i in p[: self.shot]]
        query = [int(i) for p in picks for i in p[self.shot :]]
        return support + query

    def __iter__(self) -> Iterator[list[int]]:
        rank, world = self.replicas()
        mine = range(self.episodes_per_rank())
        for start in range(0, len(mine), self.episodes_per_batch):
            steps = mine[start : start + self.episodes_per_batch]
            yield [i for step in steps for i in self.episode(step * world + rank)]


class EpisodeCollate:
    """Sampler-ordered samples -> ``(support, support_labels, query, query_labels)``.

    Labels are the dataset's original class ids; the model remaps them to ``0..N-1``.
    Inputs are images ``[N, C, H, W]``, or int64 dataset indices ``[N]`` from an
    :class:`IndexDataset` (cached-embedding evaluation). With ``query`` given, the samples are
    several whole episodes (``episodes_per_batch``) and every output gains a leading episode
    dimension: ``[E, S]``, ``[E, S]``, ``[E, Q]``, ``[E, Q]``.
    """

    def __init__(self, way: int, shot: int, query: int | None = None):
        self.n_support = way * shot
        self.episode_size = None if query is None else way * (shot + query)

    def __call__(
        self, samples: list
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = default_collate(samples)
        k = self.n_support
        if self.episode_size is not None:
            x = x.view(-1, self.episode_size, *x.shape[1:])
            y = y.view(-1, self.episode_size)
            return x[:, :k], y[:, :k], x[:, k:], y[:, k:]
        return x[:k], y[:k], x[k:], y[k:]


class IndexDataset(Dataset):
    """``(index, label)`` pairs over ``dataset``, without loading images.

    Evaluation with a frozen backbone embeds ``dataset`` once and looks embeddings up by index.
    """

    def __init__(self, dataset: Dataset, labels: np.ndarray):
        self.dataset, self.labels = dataset, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, int(self.labels[index])


class LabelledFilesDataset(Dataset):
    """``(transform(load_rgb(file)), label)`` over a list of image files."""

    def __init__(self, files: Sequence[str | Path], labels: np.ndarray, transform=None):
        self.files, self.labels, self.transform = list(files), labels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image = load_rgb(self.files[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class FewShotDataModule(ImageDataModule):
    """Episodes over *disjoint class splits*: train, validate and test on different classes.

    Datasets (``dataset``) and their default class splits (override with ``train_classes``,
    ``val_classes``, ``test_classes``: class ids or names):

    - ``digits`` (offline, scikit-learn's handwritten digits): train 0-4, test 5-9. Only 10
      classes exist, so validation also uses classes 5-9 but on the other half of their images
      (seeded, stratified): val and test share classes, never images. Use validation to monitor,
      and report the test numbers.
    - ``cifar10`` (torchvision, ``root``; 60,000 images of train + test pooled): train
      airplane/automobile/bird/cat/deer (0-4), val/test dog/frog/horse/ship/truck (5-9), split
      by image halves like digits.
    - ``flowers102`` (torchvision, ``root``; all 8,189 images pooled): a seeded 62/20/20 class
      permutation; shipped configs store the lists explicitly.
    - ``folder``: ``root/<class>/*.jpg``, a seeded 60/20/20 split of the class folders.

    Whenever ``val_classes`` and ``test_classes`` overlap, the shared classes' images are split
    in halves between them. ``train`` and ``test`` classes must be disjoint.

    Evaluation episodes are ``way``-way ``shot``-shot with ``query`` queries per class; training
    may use other values (``train_way``, ... default to the evaluation ones; the paper trains
    with a higher way). ``num_classes`` is the evaluation way (the CLI links it to the model);
    ``class_names`` names the dataset's class ids that episodes carry.

    Episodes go through :class:`EpisodicBatchSampler` as ``batch_sampler``: correct with
    ``Trainer(use_distributed_sampler=True)`` (default; Lightning's injected
    ``DistributedSampler`` is only read for the rank) and with ``False``. Validation and test
    episodes are the same every epoch (``seed + 1``, ``seed + 2``); training episodes change
    each epoch. Test over >= 600 episodes for the paper's 95 % confidence interval. With a
    frozen backbone whose embeddings are cached, validation and test run
    ``eval_episodes_per_batch`` episodes per loader step (one vectorised computation, the same
    episodes and numbers) instead of paying a Lightning step per episode.

    Example:
        >>> dm = FewShotDataModule("digits", backbone="conv4", image_size=28, way=5, shot=1)
        >>> dm.setup("fit"); support, s_labels, query, q_labels = next(iter(dm.train_dataloader()))
        >>> support.shape, query.shape
        (torch.Size([5, 3, 28, 28]), torch.Size([75, 3, 28, 28]))
    """

    default_workers = 0  # digits/CIFAR are in memory; set num_workers for image files

    def __init__(
        self,
        dataset: str = "digits",
        root: str = "data",
        download: bool = False,
        train_classes: list[int | str] | None = None,
        val_classes: list[int | str] | None = None,
        test_classes: list[int | str] | None = None,
        way: int = 5,
        shot: int = 5,
        query: int = 15,
        train_way: int | None = None,
        train_shot: int | None = None,
        train_query: int | None = None,
        train_episodes: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        backbone: str = "conv4",
        weights: str | None = "DEFAULT",
        image_size: int | None = None,
        augment: str = "none",
        num_workers: int | None = None,
        seed: int = 0,
        eval_episodes_per_batch: int = 100,
    ):
        if dataset not in DATASETS:
            raise ValueError(f"unknown few-shot dataset '{dataset}'; valid: {list(DATASETS)}")
        super().__init__(
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            augment=augment,
            num_workers=num_workers,
            seed=seed,
        )
        if eval_episodes_per_batch < 1:
            raise ValueError(f"eval_episodes_per_batch must be >= 1, got {eval_episodes_per_batch}")
        self.save_hyperparameters()  # only this class's arguments (the base's batch_size etc. do not apply)
        self.dataset = dataset
        self.root = Path(root)
        self.way, self.shot, self.query = way, shot, query
        self.train_way = train_way or way
        self.train_shot = train_shot or shot
        self.train_query = query if train_query is None else train_query
        self._names: list[str] | None = None
        self._labels: np.ndarray | None = None
        self._parts: dict[str, np.ndarray] | None = None

    # --- classes ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """The evaluation way (the number of classes a test episode asks the model to tell apart)."""
        return self.way

    @property
    def class_names(self) -> list[str]:
        """Names of all the dataset's class ids (the labels episodes carry)."""
        if self._names is None:
            if self.dataset == "digits":
                self._names = [str(i) for i in range(10)]
            elif self.dataset == "cifar10":
                self._names = list(CIFAR10_CLASSES)
            elif self.dataset == "flowers102":
                self._names = [str(i) for i in range(102)]
            else:
                self._names = self._folder_classes()
        return self._names

    def _folder_classes(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"few-shot folder '{self.root}' does not exist (expected root/<class>/*.jpg)"
            )
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not names:
            raise DataError(f"no class folders under '{self.root}' (expected root/<class>/*.jpg)")
        return names

    def _class_ids(self, given: list[int | str] | None, default: list[int], what: str) -> list[int]:
        if given is None:
            return default
        names = self.class_names
        ids = []
        for c in given:
            if isinstance(c, str) and c in names:
                ids.append(names.index(c))
            elif isinstance(c, int) and 0 <= c < len(names):
                ids.append(c)
            else:
                raise ValueError(
                    f"{what}: unknown class {c!r}; use ids 0..{len(names) - 1} or names like {names[:3]}"
                )
        return ids

    def class_splits(self) -> dict[str, list[int]]:
        """``{"train": [...], "val": [...], "test": [...]}`` class ids after defaults and overrides."""
        n = len(self.class_names)
        if self.dataset in ("digits", "cifar10"):
            defaults = {
                "train": list(range(5)),
                "val": list(range(5, 10)),
                "test": list(range(5, 10)),
            }
        else:
            perm = np.random.default_rng(self.hparams.seed).permutation(n).tolist()
            fractions = (0.6, 0.2) if self.dataset == "folder" else (62 / 102, 20 / 102)
            a, b = round(fractions[0] * n), round((fractions[0] + fractions[1]) * n)
            defaults = {
                "train": sorted(perm[:a]),
                "val": sorted(perm[a:b]),
                "test": sorted(perm[b:]),
            }
        splits = {
            "train": self._class_ids(
                self.hparams.train_classes, defaults["train"], "train_classes"
            ),
            "val": self._class_ids(self.hparams.val_classes, defaults["val"], "val_classes"),
            "test": self._class_ids(self.hparams.test_classes, defaults["test"], "test_classes"),
        }
        for other in ("val", "test"):
            shared = sorted(set(splits["train"]) & set(splits[other]))
            if shared:
                raise ValueError(
                    f"train_classes and {other}_classes share classes {shared}; few-shot evaluation "
                    f"needs classes unseen in training: make them disjoint"
                )
        return splits

    # --- data ------------------------------------------------------------------------------
    def _load(self) -> None:
        """Labels of the whole dataset (and what it takes to build image datasets over indices)."""
        if self._labels is not None:
            return
        if self.dataset == "digits":
            self._images, self._labels = load_digits_images(self.image_size)
        elif self.dataset == "cifar10":
            self._images, self._labels = self._load_cifar10()
        elif self.dataset == "flowers102":
            self._files, self._labels = self._load_flowers102()
        else:
            self._files, self._labels = self._load_folder()

    def _missing(self, e: Exception) -> FileNotFoundError:
        return FileNotFoundError(
            f"{self.dataset} not found under '{self.root}' ({e}); pass download: true "
            f"(data.init_args.download) or point root at the extracted dataset"
        )

    def _load_cifar10(self) -> tuple[torch.Tensor, np.ndarray]:
        from torchvision.datasets import CIFAR10

        try:
            parts = [
                CIFAR10(str(self.root), train=t, download=self.hparams.download)
                for t in (True, False)
            ]
        except RuntimeError as e:
            raise self._missing(e) from e
        images = (
            torch.from_numpy(np.concatenate([p.data for p in parts]))
            .permute(0, 3, 1, 2)
            .contiguous()
        )
        labels = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
        return images, labels

    def _load_flowers102(self) -> tuple[list[Path], np.ndarray]:
        from torchvision.datasets import Flowers102

        try:
            parts = [
                Flowers102(str(self.root), split=s, download=self.hparams.download)
                for s in ("train", "val", "test")
            ]
        except RuntimeError as e:
            raise self._missing(e) from e
        files = [Path(f) for p in parts for f in p._image_files]
        return files, np.concatenate([np.asarray(p._labels, dtype=np.int64) for p in parts])

    def _load_folder(self) -> tuple[list[Path], np.ndarray]:
        files, labels = [], []
        for i, name in enumerate(self.class_names):
            found = list_images(self.root / name)
            files += found
            labels += [i] * len(found)
        if not files:
            raise DataError(f"no images under the class folders of '{self.root}'")
        return files, np.asarray(labels, dtype=np.int64)

    def _split_indices(self) -> dict[str, np.ndarray]:
        if self._parts is None:
            self._load()
            splits = self.class_splits()
            labels = self._labels
            parts = {k: np.flatnonzero(np.isin(labels, v)) for k, v in splits.items()}
            shared = sorted(set(splits["val"]) & set(splits["test"]))
            if shared:  # the same classes for val and test: give each half of their images
                idx = np.flatnonzero(np.isin(labels, shared))
                val_half, test_half = stratified_split(
                    labels[idx], (0.5, 0.5), seed=self.hparams.seed
                )
                only_val = parts["val"][~np.isin(labels[parts["val"]], shared)]
                only_test = parts["test"][~np.isin(labels[parts["test"]], shared)]
                parts["val"] = np.sort(np.concatenate([only_val, idx[val_half]]))
                parts["test"] = np.sort(np.concatenate([only_test, idx[test_half]]))
            self._parts = parts
        return self._parts

    def _dataset(self, indices: np.ndarray, train: bool) -> Dataset:
        resize = self.dataset != "digits"  # digits are rendered at image_size already
        hflip = self.dataset not in ("digits",)
        tf = (
            self.train_transform(resize=resize, hflip=hflip)
            if train
            else self.eval_transform(resize=resize)
        )
        labels = self._labels[indices]
        if self.dataset in ("digits", "cifar10"):
            return TensorImageDataset(self._images[indices], labels, tf)
        return LabelledFilesDataset([self._files[i] for i in indices], labels, tf)

    def split_labels(self, split: str) -> np.ndarray:
        """Dataset class ids of every sample in ``split`` (``train``, ``val`` or ``test``)."""
        return self._labels[self._split_indices()[split]]

    def train_labels(self) -> np.ndarray:
        return self.split_labels("train")

    def setup(self, stage: str | None = None) -> None:
        parts = self._split_indices()
        self.train_set = self._dataset(parts["train"], train=True)
        self.val_set = self._dataset(parts["val"], train=False)
        self.test_set = self._dataset(parts["test"], train=False)

    # --- loaders ---------------------------------------------------------------------------
    def _episodes(self, split: str, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} split; call setup() first")
        train = split == "train"
        way, shot, query = (
            (self.train_way, self.train_shot, self.train_query)
            if train
            else (self.way, self.shot, self.query)
        )
        episodes = self.hparams[f"{split}_episodes"]
        labels = self.split_labels(split)
        offset = {"train": 0, "val": 1, "test": 2}[split]
        model = (
            getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        )
        cached = not train and getattr(model, "uses_cached_embeddings", False)
        if cached:  # the model embeds `dataset` once, then looks embeddings up by index
            dataset = IndexDataset(dataset, labels)
        per_batch = self.hparams.eval_episodes_per_batch if cached else 1
        sampler = EpisodicBatchSampler(
            labels,
            way,
            shot,
            query,
            episodes,
            seed=self.hparams.seed + offset,
            reseed_each_epoch=train,
            episodes_per_batch=per_batch,
        )
        # training episodes are a function of (seed, epoch): resumable mid-epoch
        loader_class = ResumableDataLoader if train else DataLoader
        return loader_class(
            dataset,
            batch_sampler=sampler,
            collate_fn=EpisodeCollate(way, shot, query if cached else None),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._episodes("train", self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._episodes("val", self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._episodes("test", self.test_set)

    def predict_dataloader(self) -> DataLoader:
        raise ValueError(
            "FewShotDataModule has no predict split; to classify new images from a labelled support "
            "folder use tl_lightning.data.few_shot_folder.FewShotPredictDataModule"
        )
