"""Episodic sampling: N-way K-shot episodes, seeds, DDP ranks, Lightning's sampler injection, class splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from tl_lightning.data.digits import load_digits_images
from tl_lightning.data.episodes import EpisodeCollate, EpisodicBatchSampler, IndexDataset
from tl_lightning.data.few_shot import FewShotDataModule

LABELS = np.repeat(np.arange(8), 12)  # 8 classes x 12 samples
rng = np.random.default_rng(0)
rng.shuffle(LABELS)


def episodes(sampler) -> list[tuple[int, ...]]:
    return [tuple(e) for e in sampler]


@pytest.mark.parametrize(("way", "shot", "query"), [(5, 1, 15 // 3), (3, 5, 2), (8, 2, 0)])
def test_every_episode_has_way_classes_of_shot_plus_query_distinct_samples(way, shot, query):
    sampler = EpisodicBatchSampler(LABELS, way, shot, query, episodes=30, seed=1)
    assert len(sampler) == 30
    for ep in sampler:
        assert len(ep) == way * (shot + query) == len(set(ep))
        labels = LABELS[ep]
        support, queries = labels[: way * shot], labels[way * shot :]
        assert len(set(support)) == way
        # support then query, class by class, the same classes in the same order
        assert (support.reshape(way, shot) == support[::shot, None]).all()
        if query:
            assert (queries.reshape(way, query) == queries[::query, None]).all()
            assert (support[::shot] == queries[::query]).all()


def test_no_class_outside_the_labels_it_was_given():
    split = np.flatnonzero(np.isin(LABELS, [1, 4, 6]))
    sampler = EpisodicBatchSampler(LABELS[split], 3, 2, 3, episodes=20)
    for ep in sampler:
        assert set(LABELS[split][ep]) == {1, 4, 6}


def test_same_seed_same_episodes_other_seed_or_epoch_other_episodes():
    a = EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=10, seed=3)
    b = EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=10, seed=3)
    c = EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=10, seed=4)
    assert episodes(a) == episodes(b)
    assert episodes(a) != episodes(c)
    first = episodes(a)
    a.set_epoch(1)
    assert episodes(a) != first  # training: new episodes every epoch
    fixed = EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=10, seed=3, reseed_each_epoch=False)
    before = episodes(fixed)
    fixed.set_epoch(5)
    assert episodes(fixed) == before  # evaluation: the same episodes every time


def test_two_ranks_draw_different_episodes_whose_union_is_the_single_process_set():
    single = episodes(EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=12, seed=0))
    r0 = episodes(EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=12, seed=0, rank=0, world_size=2))
    r1 = episodes(EpisodicBatchSampler(LABELS, 5, 1, 3, episodes=12, seed=0, rank=1, world_size=2))
    assert len(r0) == len(r1) == 6
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(single)


def test_uneven_episode_count_rounds_up_with_fresh_episodes():
    r0 = episodes(EpisodicBatchSampler(LABELS, 4, 1, 2, episodes=5, rank=0, world_size=2))
    r1 = episodes(EpisodicBatchSampler(LABELS, 4, 1, 2, episodes=5, rank=1, world_size=2))
    assert len(r0) == len(r1) == 3  # same number of steps on every rank: no DDP hang
    assert len(set(r0 + r1)) == 6  # no repeated episode


def test_lightning_sampler_injection_keeps_episodes_and_takes_the_rank():
    """What ``Trainer(use_distributed_sampler=True)`` does under DDP, without the processes."""
    dataset = TensorDataset(torch.arange(len(LABELS)), torch.from_numpy(LABELS))
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = DataLoader(
            dataset, batch_sampler=EpisodicBatchSampler(LABELS, 5, 2, 3, episodes=8, seed=2)
        )
    injected = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True)
    new = _update_dataloader(loader, injected, mode=RunningStage.TRAINING)
    assert isinstance(new.batch_sampler, EpisodicBatchSampler)
    assert new.batch_sampler.replicas() == (1, 2)
    expected = episodes(
        EpisodicBatchSampler(LABELS, 5, 2, 3, episodes=8, seed=2, rank=1, world_size=2)
    )
    assert [tuple(x.tolist()) for x, _ in new] == expected


def test_sampler_rejects_impossible_episodes():
    with pytest.raises(ValueError, match="need >= 9 classes"):
        EpisodicBatchSampler(LABELS, 9, 1, 1, episodes=1)
    with pytest.raises(ValueError, match="fewer than shot \\+ query = 13"):
        EpisodicBatchSampler(LABELS, 2, 10, 3, episodes=1)
    with pytest.raises(ValueError, match="shot must be >= 1"):
        EpisodicBatchSampler(LABELS, 2, 0, 3, episodes=1)


def test_collate_splits_support_and_query():
    samples = [(torch.full((1,), i), lab) for i, lab in enumerate([4, 7, 4, 7, 4, 7])]
    s, sl, q, ql = EpisodeCollate(way=2, shot=1)(samples)
    assert s.shape == (2, 1) and q.shape == (4, 1)
    assert sl.tolist() == [4, 7] and ql.tolist() == [4, 7, 4, 7]


# --- FewShotDataModule --------------------------------------------------------------------------
def digits_dm(**kwargs) -> FewShotDataModule:
    args = {
        "dataset": "digits",
        "backbone": "conv4",
        "image_size": 16,
        "way": 3,
        "shot": 2,
        "query": 2,
    }
    dm = FewShotDataModule(**{**args, **kwargs})
    dm.setup("fit")
    return dm


def test_digits_classes_split_disjoint_and_val_test_share_no_image():
    dm = digits_dm()
    assert dm.class_splits() == {
        "train": [0, 1, 2, 3, 4],
        "val": [5, 6, 7, 8, 9],
        "test": [5, 6, 7, 8, 9],
    }
    parts = dm._split_indices()
    assert not set(parts["val"]) & set(parts["test"])
    assert set(dm.split_labels("train")) == {0, 1, 2, 3, 4}
    assert set(dm.split_labels("test")) == {5, 6, 7, 8, 9}
    _, labels = load_digits_images(8)
    assert len(parts["val"]) + len(parts["test"]) == int(np.isin(labels, range(5, 10)).sum())
    assert dm.num_classes == 3 and dm.class_names == [str(i) for i in range(10)]


def test_loaders_yield_episodes_of_the_right_split_and_shape():
    dm = digits_dm(train_way=4, train_shot=1, train_query=3, train_episodes=4, test_episodes=3)
    for s, sl, q, ql in dm.train_dataloader():
        assert s.shape == (4, 3, 16, 16) and q.shape == (12, 3, 16, 16)
        assert set(sl.tolist()) <= {0, 1, 2, 3, 4} and set(ql.tolist()) == set(sl.tolist())
    test_eps = list(dm.test_dataloader())
    assert len(test_eps) == 3
    for s, sl, q, _ in test_eps:
        assert s.shape == (6, 3, 16, 16) and q.shape == (6, 3, 16, 16)
        assert set(sl.tolist()) <= {5, 6, 7, 8, 9}
    again = [ep[1].tolist() + ep[3].tolist() for ep in dm.test_dataloader()]
    assert again == [ep[1].tolist() + ep[3].tolist() for ep in test_eps]  # fixed test episodes


def test_cached_models_get_index_only_eval_episodes():
    dm = digits_dm()

    assert dm.use_frozen_features("test")  # what a model with cached embeddings asks
    loader = dm.test_dataloader()
    assert isinstance(loader.dataset, IndexDataset) and loader.dataset.dataset is dm.test_set
    labels = torch.as_tensor(dm.split_labels("test"))
    batches = list(loader)
    # 600 test episodes, 100 per step: [E, S] indices, the same episodes one-at-a-time draws
    assert [len(b[0]) for b in batches] == [100] * 6
    s, sl, q, ql = batches[0]
    assert s.dtype == torch.int64 and s.shape == (100, 3 * 2) and q.shape == (100, 3 * 2)
    assert (labels[torch.cat([s, q], 1)] == torch.cat([sl, ql], 1)).all()
    one_at_a_time = EpisodicBatchSampler(labels, 3, 2, 2, 600, seed=2, reseed_each_epoch=False)
    batched = [row for b in batches for row in torch.cat([b[0], b[2]], 1).tolist()]
    assert batched == list(one_at_a_time)


def test_episode_batches_under_ddp_cover_the_same_episodes():
    labels = np.repeat(np.arange(4), 6)
    drawn = []
    for rank in (0, 1):
        sampler = EpisodicBatchSampler(
            labels, 2, 1, 1, 7, seed=3, reseed_each_epoch=False, rank=rank, world_size=2,
            episodes_per_batch=3,
        )  # fmt: skip
        assert len(sampler) == 2  # 4 episodes per rank (7 rounded up to 8), 3 per step
        flat = [i for batch in sampler for i in batch]
        drawn += [tuple(flat[j : j + 4]) for j in range(0, len(flat), 4)]  # 2 x (1 + 1) each
    one_process = EpisodicBatchSampler(labels, 2, 1, 1, 8, seed=3, reseed_each_epoch=False)
    assert sorted(drawn) == sorted(map(tuple, one_process))


def test_class_overrides_by_name_or_id_and_overlap_is_an_error():
    dm = FewShotDataModule(
        "digits", backbone="conv4", train_classes=["0", 1, 2], test_classes=[7, 8, 9]
    )
    assert dm.class_splits()["train"] == [0, 1, 2]
    with pytest.raises(ValueError, match="share classes \\[2\\]"):
        FewShotDataModule(
            "digits", backbone="conv4", train_classes=[0, 1, 2], test_classes=[2, 3]
        ).class_splits()
    with pytest.raises(ValueError, match="unknown class 'cat'"):
        FewShotDataModule("digits", backbone="conv4", train_classes=["cat"]).class_splits()
    with pytest.raises(ValueError, match="unknown few-shot dataset"):
        FewShotDataModule("mnist")


def test_folder_dataset_splits_class_folders(tmp_path):
    images, labels = load_digits_images(16)
    for c in range(10):
        (tmp_path / f"c{c}").mkdir()
        for k, i in enumerate(np.flatnonzero(labels == c)[:6]):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(
                tmp_path / f"c{c}" / f"{k}.png"
            )
    dm = FewShotDataModule(
        "folder", root=str(tmp_path), backbone="conv4", image_size=16, way=2, shot=1, query=2
    )
    splits = dm.class_splits()
    assert [len(splits[k]) for k in ("train", "val", "test")] == [6, 2, 2]
    dm.setup("fit")
    s, sl, q, ql = next(iter(dm.test_dataloader()))
    assert s.shape == (2, 3, 16, 16) and set(sl.tolist()) == set(splits["test"])


def test_missing_torchvision_dataset_says_how_to_fix(tmp_path):
    dm = FewShotDataModule("cifar10", root=str(tmp_path), backbone="conv4")
    with pytest.raises(FileNotFoundError, match="download: true"):
        dm.setup("fit")
