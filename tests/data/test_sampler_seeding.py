"""The training order: a fresh permutation every epoch, a function of (seed, epoch) only, also through a Trainer."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import TensorDataset

from tl_lightning.data.resumable_sampler import ResumableDataLoader, ResumableRandomSampler


def _orders(seed: int, epochs: int, n: int = 20) -> list[list[int]]:
    sampler = ResumableRandomSampler(n, seed=seed)
    orders = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    return orders


def test_each_epoch_is_a_new_permutation_and_each_seed_its_own_sequence():
    a, b, other = _orders(0, 4), _orders(0, 4), _orders(1, 4)
    for order in a:
        assert sorted(order) == list(range(20))  # every sample once
    assert a == b  # reproducible from (seed, epoch) alone
    assert len({tuple(o) for o in a}) == 4  # a new order every epoch
    assert all(x != y for x, y in zip(a, other))  # another seed, other orders
    # set_epoch jumps straight to an epoch: no state carried from the epochs before
    late = ResumableRandomSampler(20, seed=0)
    late.set_epoch(3)
    assert list(late) == a[3]


def test_weighted_draws_also_change_with_the_epoch():
    sampler = ResumableRandomSampler(30, seed=0, weights=[1.0] * 30)
    draws = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        draws.append(list(sampler))
    assert len({tuple(d) for d in draws}) == 3


class _Orders(Callback):
    def __init__(self):
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch[0].view(-1).long().tolist())


class _Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0].float()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_sees_a_new_order_every_epoch_and_the_same_run_twice(tmp_path):
    def run() -> dict[int, list[int]]:
        data = TensorDataset(torch.arange(12))
        loader = ResumableDataLoader(
            data, batch_size=4, sampler=ResumableRandomSampler(12, seed=7), seed=7
        )
        orders = _Orders()
        Trainer(
            max_epochs=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=[orders],
        ).fit(_Tiny(), loader)
        return orders.seen

    first, second = run(), run()
    assert first == second
    assert all(sorted(order) == list(range(12)) for order in first.values())
    assert len({tuple(o) for o in first.values()}) == 3


class _FixedOrder(torch.utils.data.Sampler):
    """The same order every epoch: only the epoch number may change a batch transform's draw."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def test_batch_transform_draws_from_a_stream_of_seed_epoch_and_batch_index():
    import numpy as np

    def draws(epoch: int, seed: int = 3, skip: int = 0, workers: int = 0) -> list[float]:
        loader = ResumableDataLoader(
            list(range(8)), batch_size=2, sampler=_FixedOrder(8), seed=seed, num_workers=workers,
            batch_transform=lambda batch: torch.rand(()).item(),  # one draw per batch
        )  # fmt: skip
        loader.load_state_dict({"epoch": epoch, "batches": skip})
        torch.manual_seed(100 + workers)  # the caller's stream must not matter...
        got = list(loader)
        after = torch.rand(()).item()
        torch.manual_seed(100 + workers)
        assert after == torch.rand(()).item()  # ...nor be moved
        return got

    def expected(seed: int, epoch: int, batch: int) -> float:
        # numpy's SeedSequence of (seed, epoch, batch, stream 1), top 63 bits of its first word
        word = np.random.SeedSequence([seed, epoch, batch, 1]).generate_state(2, np.uint64)[0]
        return torch.rand((), generator=torch.Generator().manual_seed(int(word >> 1))).item()

    assert draws(1) == [expected(3, 1, b) for b in range(4)]
    assert draws(1, workers=2) == draws(1)
    assert draws(1, skip=2) == draws(1)[2:]  # resumed after 2 batches: the same later draws
    assert draws(2) == [expected(3, 2, b) for b in range(4)] != draws(1)
