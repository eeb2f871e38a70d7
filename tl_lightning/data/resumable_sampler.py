"""Training data order that a run killed mid-epoch can resume exactly, batch for batch.

Lightning 2.6 restores a loader's position only when the loader itself is stateful (it calls
``state_dict()`` / ``load_state_dict()`` on the DataLoader, not on its sampler). A plain
``DataLoader(shuffle=True)`` is not, so a run resumed from a mid-epoch checkpoint keeps its batch
counter but starts a fresh iterator: it trains on the first batches of a new random permutation
(some samples twice, others never) instead of the rest of the interrupted one.

:class:`ResumableRandomSampler` draws each epoch's order from ``(seed, epoch)`` alone, and
:class:`ResumableDataLoader` counts the batches it has handed out, saves ``(epoch, batches)`` in the
checkpoint and, on resume, skips that many batches of the same order at the index level (no
image is decoded for the skipped part).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from tl_lightning.data.seeded_samples import BATCH_STREAM, sample_seed, seeded_call


class ResumableRandomSampler(Sampler[int]):
    """A shuffled (or class-weighted) order that depends only on ``seed`` and the epoch.

    Lightning calls :meth:`set_epoch` before each epoch, so epoch ``e`` always yields the same
    order, in a fresh process too. With ``weights`` it draws ``num_samples`` indices with
    replacement in proportion to them (the ``sampler: weighted`` option). With ``keyed=True`` it
    yields ``(epoch, index)`` pairs for :class:`~tl_lightning.data.seeded_samples.SeededSamples`.

    Example:
        >>> sampler = ResumableRandomSampler(5, seed=0)
        >>> sampler.set_epoch(1)
        >>> sorted(sampler) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        keyed: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if weights is not None and len(weights) != num_samples:
            raise ValueError(f"got {len(weights)} weights for {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.epoch = 0
        self.keyed = keyed  # yield (epoch, index) for SeededSamples (per-sample augmentation seeds)

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (called by Lightning at every epoch start)."""
        self.epoch = epoch

    def order(self) -> list[int]:
        """The full index order of the current epoch."""
        # a large odd multiplier keeps (seed, epoch) pairs from colliding for small values
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.weights is None:
            return torch.randperm(self.num_samples, generator=generator).tolist()
        drawn = torch.multinomial(self.weights, self.num_samples, True, generator=generator)
        return drawn.tolist()

    def __iter__(self) -> Iterator[int]:
        # computed at the first pull, after Lightning's set_epoch for the epoch
        order, epoch = self.order(), self.epoch
        yield from ((epoch, i) for i in order) if self.keyed else order

    def __len__(self) -> int:
        return self.num_samples


class _SkipFirst:
    """An index (batch) sampler that skips the loader's pending ``_skip_now`` first items.

    DataLoader iterators call ``iter()`` on it while they are being created (twice with worker
    processes), when the loader has set ``_skip_now``; persistent-worker iterators call it again
    at later epochs, when ``_skip_now`` is back to 0 and the epoch is whole.
    """

    def __init__(self, sampler: Any, loader: ResumableDataLoader) -> None:
        self.sampler, self.loader = sampler, loader

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.loader._skip_now, None)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.loader._skip_now, 0)


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can checkpoint mid-epoch and resume at the next batch.

    Its state is ``{"epoch", "batches"}``: the sampler's epoch and how many batches this epoch
    has yielded. Loading it makes the next iterator skip those batches of the same epoch's order,
    so a deterministic sampler (:class:`ResumableRandomSampler`, or any sampler whose order is a
    function of ``set_epoch``) continues where the killed run stopped. A state saved after the
    last batch of an epoch resumes at the start of the next one. The loader gets its own seeded
    ``generator`` so creating an iterator never draws from the global RNG (the model's dropout
    stream stays identical between an interrupted and an uninterrupted run).

    ``batch_transform`` (MixUp/CutMix) runs on each collated batch in this (the main) process,
    drawing from a stream seeded by ``(seed, epoch, batch index in the epoch)``: the same batch
    gets the same mix whatever ``num_workers`` is, and after a resume (a worker's own stream
    would depend on which worker collated it).

    Example:
        >>> loader = ResumableDataLoader(list(range(10)), batch_size=2,
        ...                              sampler=ResumableRandomSampler(10, seed=0))
        >>> loader.load_state_dict({"epoch": 0, "batches": 3})
        >>> len(list(loader))
        2
    """

    def __init__(
        self, *args: Any, seed: int = 0, batch_transform: Any = None, **kwargs: Any
    ) -> None:
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        super().__init__(*args, **kwargs)
        self.seed, self.batch_transform = seed, batch_transform
        self._yielded = 0
        self._skip = 0
        self._skip_now = 0

    @property
    def _epoch_sampler(self) -> Any:
        # a batch sampler with set_epoch (episodes) orders the data when there is one
        for sampler in (self.batch_sampler, self.sampler):
            if hasattr(sampler, "set_epoch"):
                return sampler
        return None

    @property
    def _index_sampler(self) -> Any:
        # DataLoader iterators read this when they start (and on every persistent-worker reset)
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:
        self._skip_now, self._skip = self._skip, 0
        self._yielded = self._skip_now
        try:
            iterator = super().__iter__()
        finally:
            self._skip_now = 0  # later epochs (and persistent-worker resets) are whole
        return self._counting(iterator)

    def _counting(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            index, self._yielded = self._yielded, self._yielded + 1
            if self.batch_transform is not None and not (isinstance(batch, list) and not batch):
                epoch = int(getattr(self._epoch_sampler, "epoch", 0))
                seed = sample_seed(self.seed, epoch, index, BATCH_STREAM)
                batch = seeded_call(seed, self.batch_transform, batch)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Where this epoch stands: ``{"epoch": e, "batches": batches yielded so far}``."""
        sampler = self._epoch_sampler
        return {"epoch": int(getattr(sampler, "epoch", 0)), "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after ``state["batches"]`` batches of epoch ``state["epoch"]``."""
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if batches >= len(self):  # the epoch was complete: start the next one from its beginning
            epoch, batches = epoch + 1, 0
        sampler = self._epoch_sampler
        if sampler is not None:
            # Lightning sets the epoch only after it has created the resumed iterator
            sampler.set_epoch(epoch)
        self._skip = batches
