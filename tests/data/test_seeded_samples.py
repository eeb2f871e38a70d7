"""SeededSamples: each sample's draws come from (seed, epoch, index); datasets that draw nothing
(cached features) are read a batch at a time, with no per-sample RNG stream."""

from __future__ import annotations

import torch

from tl_lightning.data.seeded_samples import SeededSamples


class Noisy:
    """Draws from the global torch RNG, like a random crop."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return i, torch.rand(1).item()


class Cached:
    """Like FeatureDataset: no draws, and a batched read that the DataLoader should use."""

    deterministic = True

    def __init__(self):
        self.batched_reads, self.single_reads = 0, 0

    def __len__(self):
        return 4

    def __getitem__(self, i):
        self.single_reads += 1
        return i

    def __getitems__(self, indices):
        self.batched_reads += 1
        return [10 * i for i in indices]


def test_a_batch_of_random_samples_equals_its_samples_each_in_its_own_stream():
    data = SeededSamples(Noisy(), seed=3)
    keys = [(1, 2), (1, 0), (2, 2)]
    torch.manual_seed(0)
    batch = data.__getitems__(keys)
    torch.manual_seed(99)  # the caller's stream does not matter
    assert batch == [data[k] for k in keys]
    assert batch[0] != batch[2]  # same sample, another epoch: another draw


def test_a_dataset_that_draws_nothing_is_read_once_per_batch():
    cached = Cached()
    data = SeededSamples(cached, seed=0)
    assert data.__getitems__([(5, 3), (5, 1)]) == [30, 10]
    assert (cached.batched_reads, cached.single_reads) == (1, 0)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=[(0, 0), (0, 1), (0, 2)])
    assert [b.tolist() for b in loader] == [[0, 10], [20]]
    assert cached.batched_reads == 3


def test_cached_features_say_they_draw_nothing_and_the_frozen_phase_only_while_serving_them(tmp_path):
    import numpy as np

    from tl_lightning.callbacks.unfreezing import FrozenPhaseDataset
    from tl_lightning.feature_cache import FeatureDataset

    np.save(tmp_path / "features.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(3, np.int64))
    features = FeatureDataset(tmp_path)
    assert features.deterministic
    frozen = FrozenPhaseDataset(Noisy(), "train_set")
    frozen.features = features
    assert not frozen.deterministic  # images: augmentation draws, seeded per sample
    frozen.use_features.fill_(True)
    assert frozen.deterministic
