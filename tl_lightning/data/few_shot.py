"""Few-shot training data: N-way K-shot episodes over disjoint class splits of one source."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tl_lightning.backbones import conv4 as _conv4  # noqa: F401  (registers the default backbone)
from tl_lightning.data.base import ImageDataModule, ResumableSkipFailedDataLoader
from tl_lightning.data.cifar10 import CIFAR10Source
from tl_lightning.data.decode import SkipFailedDataLoader
from tl_lightning.data.digits import DigitsSource
from tl_lightning.data.episodes import EpisodeCollate, EpisodicBatchSampler, IndexDataset
from tl_lightning.data.flowers102 import Flowers102Source
from tl_lightning.data.image_folder import ImageFolderSource
from tl_lightning.data.source import ImageSource, LabelledImages
from tl_lightning.data.split import stratified_split

log = logging.getLogger(__name__)


# --- deprecated (remove in the next release): the dataset name -> source switch -----------------
def _deprecated_dataset_source(
    dataset: str, root: str | None, download: bool | None
) -> ImageSource:
    """The source an old ``dataset`` name stood for, with a FutureWarning naming its spelling."""
    root, download = "data" if root is None else root, bool(download)
    sources = {
        "digits": lambda: DigitsSource(),
        "cifar10": lambda: CIFAR10Source(root, download),
        "flowers102": lambda: Flowers102Source(root, download),
        "folder": lambda: ImageFolderSource(root),
    }
    if dataset not in sources:
        raise ValueError(f"unknown few-shot dataset '{dataset}'; valid: {list(sources)}")
    source = sources[dataset]()
    config = source.config()
    args = ", ".join(f"{k}: {json.dumps(v)}" for k, v in config["init_args"].items())
    warnings.warn(
        f"FewShotDataModule: dataset='{dataset}' (with root/download) is deprecated and goes in "
        f"the next release; give the source instead, in YAML `source: {{class_path: "
        f"{config['class_path']}, init_args: {{{args}}}}}`, in Python "
        f"source={type(source).__name__}(...)",
        FutureWarning,
        stacklevel=4,
    )
    return source


def _resolve_source(
    source: ImageSource | str | None, dataset: str | None, root: str | None, download: bool | None
) -> ImageSource:
    """``source`` (default: the digits), or the source a deprecated ``dataset`` name stands for
    (also given as the first positional argument, as before)."""
    if isinstance(source, str) and dataset is None:
        source, dataset = None, source
    if dataset is not None:
        if source is not None:
            raise ValueError("give either source or the deprecated dataset, not both")
        return _deprecated_dataset_source(dataset, root, download)
    if root is not None or download is not None:
        raise ValueError(
            "root and download only go with the deprecated dataset; set them in the source's "
            "init_args (e.g. source: {class_path: tl_lightning.data.flowers102.Flowers102Source, "
            "init_args: {root: data, download: true}})"
        )
    source = DigitsSource() if source is None else source
    if not isinstance(source, ImageSource):
        raise ValueError(
            f"source must be an ImageSource such as tl_lightning.data.digits.DigitsSource "
            f"(in YAML: class_path + init_args), got {type(source).__name__}"
        )
    return source


class FewShotDataModule(ImageDataModule):
    """Episodes over *disjoint class splits*: train, validate and test on different classes.

    ``source`` is any :class:`~tl_lightning.data.source.ImageSource` (default: the offline
    digits); all its images are pooled (its own train/val/test splits are not used) and its
    *classes* are split. The default class split is the source's ``few_shot_classes``
    (override with ``train_classes``, ``val_classes``, ``test_classes``: class ids or names):

    - ``None`` (``DigitsSource``, ``DigitsMSource``, ``CIFAR10Source``): the first half of the
      classes trains, the second half validates and tests, on disjoint halves of their images
      (seeded, stratified). Digits: train 0-4, val/test 5-9; CIFAR-10 (all 60,000 images):
      train airplane/automobile/bird/cat/deer, val/test dog/frog/horse/ship/truck. Use
      validation to monitor, and report the test numbers.
    - fractions ``(train, val)``: a seeded permutation of the classes, the rest tests.
      ``Flowers102Source`` (all 8,189 images): 62/20/20 classes (the shipped config stores the
      lists explicitly); ``ImageFolderSource`` (``root/<class>/*``, scanned once like the
      classification folders): 60/20/20.

    Whenever ``val_classes`` and ``test_classes`` overlap, the shared classes' images are split
    in halves between them. ``train`` and ``test`` classes must be disjoint.

    Evaluation episodes are ``way``-way ``shot``-shot with ``query`` queries per class; training
    may use other values (``train_way``, ... default to the evaluation ones; the paper trains
    with a higher way). ``num_classes`` is the evaluation way (the CLI links it to the model);
    ``class_names`` names the source's class ids that episodes carry.

    Episodes go through :class:`EpisodicBatchSampler` as ``batch_sampler``: correct with
    ``Trainer(use_distributed_sampler=True)`` (default; Lightning's injected
    ``DistributedSampler`` is only read for the rank) and with ``False``. Validation and test
    episodes are the same every epoch (``seed + 1``, ``seed + 2``); training episodes change
    each epoch. Test over >= 600 episodes for the paper's 95 % confidence interval. With a
    frozen backbone whose embeddings are cached, validation and test run
    ``eval_episodes_per_batch`` episodes per loader step (one vectorised computation, the same
    episodes and numbers) instead of paying a Lightning step per episode.

    Deprecated (one release): ``dataset`` (``digits``, ``cifar10``, ``flowers102``, ``folder``,
    also as the first positional argument) with ``root``/``download`` instead of ``source``; it
    warns with the ``source:`` spelling to use.

    Example:
        >>> from tl_lightning.data.digits import DigitsSource
        >>> dm = FewShotDataModule(DigitsSource(), backbone="conv4", image_size=28, way=5, shot=1)
        >>> dm.setup("fit"); support, s_labels, query, q_labels = next(iter(dm.train_dataloader()))
        >>> support.shape, query.shape
        (torch.Size([5, 3, 28, 28]), torch.Size([75, 3, 28, 28]))
    """

    default_workers = 0  # digits/CIFAR are in memory; set num_workers for image files

    def __init__(
        self,
        source: ImageSource | None = None,
        root: str | None = None,
        download: bool | None = None,
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
        dataset: str | None = None,
    ):
        resolved = _resolve_source(source, dataset, root, download)
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
        if isinstance(source, ImageSource):  # plain values: hparams load with weights_only=True
            self.save_hyperparameters({**self.hparams, "source": source.config()})
        self.source = resolved
        self.way, self.shot, self.query = way, shot, query
        self.train_way = train_way or way
        self.train_shot = train_shot or shot
        self.train_query = query if train_query is None else train_query
        self._data: LabelledImages | None = None
        self._index_episodes = False  # set through use_frozen_features()
        self._labels: np.ndarray | None = None
        self._parts: dict[str, np.ndarray] | None = None

    # --- classes ---------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """The evaluation way (the number of classes a test episode asks the model to tell apart)."""
        return self.way

    @property
    def class_names(self) -> list[str]:
        """Names of all the source's class ids (the labels episodes carry)."""
        return self.source.class_names

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
        fractions = self.source.few_shot_classes
        if fractions is None:  # first half trains, second half validates and tests
            defaults = {
                "train": list(range(n // 2)),
                "val": list(range(n // 2, n)),
                "test": list(range(n // 2, n)),
            }
        else:
            perm = np.random.default_rng(self.hparams.seed).permutation(n).tolist()
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
    def prepare_data(self) -> None:
        self.source.prepare()

    def _load(self) -> None:
        """All the source's images, once (episodes index into them)."""
        if self._data is None:
            self._data = self.source.load(self.image_size)
            self._labels = self._data.labels

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
        train_tf, eval_tf = self.transforms_for(self._data)
        return self._data.dataset(indices, train_tf if train else eval_tf)

    def split_labels(self, split: str) -> np.ndarray:
        """Dataset class ids of every sample in ``split`` (``train``, ``val`` or ``test``)."""
        return self._labels[self._split_indices()[split]]

    def train_labels(self) -> np.ndarray:
        return self.split_labels("train")

    def setup(self, stage: str | None = None) -> None:
        # image episodes until this run's model asks otherwise (its setup runs after this one)
        self._index_episodes = False
        parts = self._split_indices()
        self.train_set = self._dataset(parts["train"], train=True)
        self.val_set = self._dataset(parts["val"], train=False)
        self.test_set = self._dataset(parts["test"], train=False)

    def use_frozen_features(
        self, stage: str, embed: Callable[[Dataset, str], Dataset] | None = None
    ) -> bool:
        """The hook of :meth:`ImageDataModule.use_frozen_features` for episodes.

        Validation and test episodes become index episodes, ``eval_episodes_per_batch`` per
        loader step, over the split's images (``loader.dataset.dataset``): the model embeds
        those once and looks embeddings up by index. Training episodes stay images.
        """
        self._index_episodes = True
        return True

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
        cached = not train and self._index_episodes
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
        self.route_skips(getattr(dataset, "dataset", dataset), split)
        # training episodes are a function of (seed, epoch): resumable mid-epoch
        loader_class = ResumableSkipFailedDataLoader if train else SkipFailedDataLoader
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
            "folder use tl_lightning.data.few_shot_predict.FewShotPredictDataModule"
        )
