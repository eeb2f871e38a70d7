"""N-way K-shot episodes: a seeded, DDP-correct episode sampler and its collate.

An *episode* is a tiny classification task: ``way`` classes drawn from one class split, ``shot``
labelled support images and ``query`` images to classify per class. Few-shot methods train
and are evaluated on episodes whose classes they have never seen in training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, default_collate

from tl_lightning.data.decode import is_failed


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

    An episode with an image that failed to load becomes ``[]``, which
    :class:`~tl_lightning.data.decode.SkipFailedDataLoader` skips: a missing image would unbalance
    the episode, and a replacement would carry a wrong label. Labels are the dataset's original class ids; the model remaps them to ``0..N-1``.
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
        if any(is_failed(s) for s in samples):
            return []  # an image failed to load (reported in the skip log): drop the episode
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
