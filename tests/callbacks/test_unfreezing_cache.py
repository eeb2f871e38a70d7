"""GradualUnfreezing's cached frozen phase: the same head weights as training on images, resume inside it."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.helpers import tiny_digits
from tl_lightning.callbacks.unfreezing import FrozenPhaseDataset, GradualUnfreezing
from tl_lightning.modules.finetune import FineTuneModule

pytestmark = pytest.mark.usefixtures("one_thread")


class InputKinds(Callback):
    """The number of dimensions of each training batch's inputs, per epoch (2: features, 4: images)."""

    def __init__(self):
        self.ndim: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ndim.setdefault(trainer.current_epoch, set()).add(batch[0].ndim)


def model() -> FineTuneModule:
    seed_everything(0)
    return FineTuneModule(
        num_classes=10,
        backbone="resnet18",
        weights=None,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        channels_last=False,
    )


def fit(
    tmp_path,
    epochs: int,
    cache: bool,
    callbacks=(),
    ckpt_path=None,
    bn="eval",
    batch=16,
    workers=0,
    **kw,
):
    net = model()
    kinds = InputKinds()
    unfreeze = GradualUnfreezing(unfreeze_at_epoch=2, lr_ratio=0.1, cache_frozen=cache, bn=bn)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=4,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        callbacks=[unfreeze, kinds, *callbacks],
        **kw,
    )
    dm = tiny_digits(batch_size=batch, num_workers=workers)
    trainer.fit(net, datamodule=dm, ckpt_path=ckpt_path)
    return net, kinds, trainer, dm


def test_cached_frozen_phase_gives_the_uncached_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cached, kinds, trainer, dm = fit(tmp_path, 3, cache=True)
    plain, plain_kinds, _, _ = fit(tmp_path, 3, cache=False)
    # features in the two frozen epochs, images from the unfreeze on; the plain run: images only
    assert kinds.ndim == {0: {2}, 1: {2}, 2: {4}}
    assert plain_kinds.ndim == {0: {4}, 1: {4}, 2: {4}}
    # the datamodule gets its image datasets back
    assert not isinstance(dm.train_set, FrozenPhaseDataset) and dm.train_set[0][0].ndim == 3
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())


def test_frozen_phase_weights_match_after_two_epochs(tmp_path, monkeypatch):
    # the head alone, right at the switch: the strictest comparison of the cached phase
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cached, kinds, *_ = fit(tmp_path, 2, cache=True)
    plain, *_ = fit(tmp_path, 2, cache=False)
    assert kinds.ndim == {0: {2}, 1: {2}}
    before = model()
    assert not torch.equal(before.head[-1].weight, cached.head[-1].weight)  # it did train
    for a, b in zip(cached.head.parameters(), plain.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_inside_the_cached_frozen_phase(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    reference, *_ = fit(tmp_path, 3, cache=True, callbacks=[ckpt])
    # epoch=0.ckpt: one frozen epoch done, the second (cached) one and the unfreeze still to come
    resumed, kinds, _, _ = fit(
        tmp_path, 3, cache=True, ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt"
    )
    assert kinds.ndim == {1: {2}, 2: {4}}
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_no_cache_where_it_would_not_be_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    net = model()
    kinds = InputKinds()
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        callbacks=[GradualUnfreezing(unfreeze_at_epoch=2, bn="train"), kinds],
    )
    trainer.fit(net, datamodule=tiny_digits(batch_size=16))
    assert kinds.ndim == {0: {4}}
    kinds2 = InputKinds()
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        callbacks=[GradualUnfreezing(unfreeze_at_epoch=2), kinds2],
    )
    trainer.fit(model(), datamodule=tiny_digits(batch_size=16, augment="basic"))
    assert kinds2.ndim == {0: {4}}


def test_stats_policy_estimates_batchnorm_statistics_once_then_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    dm = tiny_digits()
    dm.setup("fit")
    n = len(dm.train_set)
    batch = next(
        b for b in range(64, 1, -1) if n % b == 0
    )  # equal batches: mean of batch means = mean
    net, kinds, _, _ = fit(tmp_path, 1, cache=True, bn="stats", batch=batch)
    assert kinds.ndim == {0: {2}}
    # independent: the first BatchNorm's input is conv1(image); its statistics over all train images
    images = torch.stack([dm.train_set[i][0] for i in range(n)])
    fresh = model()  # the same initial weights (seeded); the first conv never trains here
    with torch.no_grad():
        z = fresh.backbone.body.conv1(images)
    mean = z.mean(dim=(0, 2, 3))
    var = z.var(dim=(0, 2, 3))
    bn1 = net.backbone.body.bn1
    torch.testing.assert_close(bn1.running_mean, mean, rtol=1e-4, atol=1e-5)
    # the average of per-batch variances: the full variance less the spread of the batch means
    torch.testing.assert_close(bn1.running_var, var, rtol=0.05, atol=1e-4)
    assert not torch.allclose(fresh.backbone.body.bn1.running_mean, mean, atol=1e-2)  # it moved
    # the pass's cumulative average is switched back off: after it, statistics move as usual
    assert all(
        m.momentum == f.momentum
        for m, f in zip(net.backbone.modules(), fresh.backbone.modules(), strict=True)
        if isinstance(m, torch.nn.BatchNorm2d)
    )


class BatchLabels(Callback):
    """The labels of every training batch, in order."""

    def __init__(self):
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].tolist())


def test_stats_policy_features_sit_on_their_images_rows(tmp_path, monkeypatch):
    # the one pass visits the images shuffled; its features must land on their own rows, so the
    # cached epoch sees the uncached epoch's batches (checked by their labels, in order)
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cached, plain = BatchLabels(), BatchLabels()
    _, kinds, *_ = fit(tmp_path, 1, cache=True, bn="stats", callbacks=[cached])
    fit(tmp_path, 1, cache=False, bn="stats", callbacks=[plain])
    assert kinds.ndim == {0: {2}}
    assert len(cached.labels) == 4 and cached.labels == plain.labels


class OneImageFails(torch.utils.data.Dataset):
    """The wrapped split with its image ``index`` failing to load (``None``, as a broken file)."""

    def __init__(self, images, index: int):
        self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return None if i == self.index else self.images[i]

    def __getattr__(self, name):  # transform, targets...: the split's own
        return getattr(self.__dict__["images"], name)


@pytest.mark.parametrize("bn", ["eval", "stats"])
def test_a_failed_train_image_keeps_the_frozen_phase_on_images(tmp_path, monkeypatch, caplog, bn):
    # cached rows would shift past the missing image: the frozen epochs must stay on images,
    # say so, and (stats) not spend a second pass caching features it cannot use
    from tl_lightning.data.digits import DigitsDataModule
    from tl_lightning.modules import feature_extraction

    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    setup = DigitsDataModule.setup

    def setup_with_a_failed_image(self, stage=None):
        setup(self, stage)
        if not isinstance(self.train_set, OneImageFails):
            self.train_set = OneImageFails(self.train_set, index=5)

    cached = []
    cache_split = feature_extraction.cache_split
    monkeypatch.setattr(DigitsDataModule, "setup", setup_with_a_failed_image)
    monkeypatch.setattr(
        feature_extraction,
        "cache_split",
        lambda *a, **k: cached.append(a[2]) or cache_split(*a, **k),
    )
    caplog.set_level("INFO", logger="lightning.pytorch")
    _, kinds, trainer, _ = fit(tmp_path, 1, cache=True, bn=bn)
    assert kinds.ndim == {0: {4}} and trainer.global_step == 4
    assert "train images failed to load; frozen epochs run on images" in caplog.text
    assert cached == (["train_set"] if bn == "eval" else [])


def test_persistent_workers_see_the_switch(tmp_path, monkeypatch):
    # worker processes live across epochs: the flag they read must be shared memory
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    _, kinds, *_ = fit(tmp_path, 3, cache=True, workers=2)
    assert kinds.ndim == {0: {2}, 1: {2}, 2: {4}}
