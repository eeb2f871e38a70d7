"""Augmentation randomness that is a function of (seed, epoch, sample or batch index) alone.

Random transforms draw from the global torch RNG of whichever process loads the sample: the main
process with ``num_workers=0``, a worker otherwise (seeded per worker). The same sample then gets
another crop for another ``num_workers``, and after a resume. Here each sample is loaded inside
its own RNG stream seeded from ``(seed, epoch, index)``: identical augmentations whatever the
number of workers, in the resumed run too, and the main process's stream (dropout) is untouched.
Batch-level draws (MixUp/CutMix) get the same treatment per ``(seed, epoch, batch index)`` in
:class:`~tl_lightning.data.resumable_sampler.ResumableDataLoader`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def sample_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (numpy's SeedSequence hash).

    ``stream`` separates uses that share ``(seed, epoch, index)``: 0 for a sample's augmentation,
    1 for a batch's MixUp/CutMix draw (batch ``index`` of the epoch).
    """
    entropy = [seed, epoch, index] if stream == 0 else [seed, epoch, index, stream]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


BATCH_STREAM = 1  # sample_seed's stream for per-batch draws (MixUp/CutMix)


def seeded_call(seed: int, function: Any, *args: Any) -> Any:
    """``function(*args)`` drawing from a torch RNG stream seeded with ``seed``; the caller's
    stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return function(*args)


class SeededSamples(Dataset):
    """Wrap a map-style dataset so ``dataset[(epoch, index)]`` loads ``index`` in its own RNG stream.

    Pair it with a sampler that yields ``(epoch, index)`` keys
    (:class:`~tl_lightning.data.resumable_sampler.ResumableRandomSampler` with ``keyed=True``).

    Example:
        >>> data = SeededSamples([0, 1, 2], seed=0)
        >>> class Noisy:
        ...     def __getitem__(self, i): return torch.rand(1).item()
        ...     def __len__(self): return 3
        >>> noisy = SeededSamples(Noisy(), seed=0)
        >>> noisy[(1, 2)] == noisy[(1, 2)] != noisy[(2, 2)]
        True
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        return seeded_call(sample_seed(self.seed, epoch, index), self.dataset.__getitem__, index)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        """A batch; one read and no RNG forks when the dataset draws nothing (cached features).

        Forking the RNG costs ~0.2 ms a sample, as much as a whole cached-feature step.
        """
        if getattr(self.dataset, "deterministic", False):
            indices = [index for _, index in keys]
            many = getattr(self.dataset, "__getitems__", None)
            return many(indices) if many else [self.dataset[i] for i in indices]
        return [self[key] for key in keys]
