"""Files that break after download or scan are skipped and reported by every kind of data:
Flowers-102, few-shot episodes, and both sides of a domain-adaptation pair."""

from __future__ import annotations

import shutil

import pytest
import torch
from lightning.pytorch import Trainer

from tests.data.test_bad_data import make_folder
from tests.helpers import TINY_DATA
from tl_lightning.data.decode import SKIP_LOG_NAME, read_skip_log
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.data.episodes import EpisodicBatchSampler
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.data.flowers102 import Flowers102DataModule
from tl_lightning.data.image_folder import ImageFolderSource


def attach(dm, tmp_path):
    """What Trainer.fit does to a datamodule before asking it for loaders."""
    dm.trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    return dm


def test_flowers102_image_broken_after_download_is_skipped_and_logged(flowers102_patched, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(flowers102_patched.root, root)
    dm = attach(Flowers102DataModule(root=str(root), download=False, **TINY_DATA), tmp_path)
    dm.setup("fit")
    broken = dm.val_set.paths[5]
    broken.write_bytes(b"\xff\xd8\xff not a jpeg any more")
    seen = sum(len(y) for _, y in dm.val_dataloader())
    assert seen == len(dm.val_set) - 1  # dropped, never replaced
    rows = read_skip_log(tmp_path / SKIP_LOG_NAME)
    assert [(r["split"], r["path"]) for r in rows] == [("val", str(broken))]


def test_few_shot_episode_with_a_broken_image_is_dropped_and_logged(tmp_path):
    root = make_folder(tmp_path / "shots", {f"c{c}": 6 for c in range(10)})
    dm = FewShotDataModule(
        "folder", root=str(root), backbone="conv4", image_size=16, way=2, shot=1, query=2,
        test_episodes=12,
    )  # fmt: skip
    attach(dm, tmp_path)
    dm.setup("test")
    broken_index = 3
    dm.test_set.paths[broken_index].write_bytes(b"")
    labels = dm.split_labels("test")
    all_episodes = list(EpisodicBatchSampler(labels, 2, 1, 2, 12, seed=2, reseed_each_epoch=False))
    kept = [ep for ep in all_episodes if broken_index not in ep]
    assert 0 < len(kept) < len(all_episodes)  # the broken image is in some episodes, not all
    got = [torch.cat([b[1], b[3]]).tolist() for b in dm.test_dataloader()]
    assert got == [labels[ep].tolist() for ep in kept]
    rows = read_skip_log(tmp_path / SKIP_LOG_NAME)
    assert {(r["split"], r["path"]) for r in rows} == {("test", str(dm.test_set.paths[3]))}


def test_domain_pair_logs_broken_images_of_both_sides(tmp_path):
    src = make_folder(tmp_path / "src", {"a": 8, "b": 8})
    tgt = make_folder(tmp_path / "tgt", {"a": 8, "b": 8})
    dm = DomainAdaptationDataModule(
        source=ImageFolderSource(str(src), val_fraction=0.25, test_fraction=0.25),
        target=ImageFolderSource(str(tgt), val_fraction=0.25, test_fraction=0.25),
        backbone="dann_cnn", weights=None, image_size=16, batch_size=4,
    )  # fmt: skip
    dm.prepare_data()
    attach(dm, tmp_path)
    dm.setup("fit")
    source, target = dm.sets["source"], dm.sets["target"]
    bad_source_val = source["val"].paths[0]
    bad_target_train = target["train"].paths[0]
    for path in (bad_source_val, bad_target_train):
        path.write_bytes(b"broken")
    targets = sum(len(b["target"]) for b, _, _ in dm.train_dataloader())
    val = [sum(len(y) for _, y in loader) for loader in dm.val_dataloader()]
    assert val == [len(source["val"]) - 1, len(target["val"])]
    assert targets == len(target["train"]) - 1  # 2 full batches, the broken image dropped
    rows = {(r["split"], r["path"]) for r in read_skip_log(tmp_path / SKIP_LOG_NAME)}
    assert rows == {("source_val", str(bad_source_val)), ("target_train", str(bad_target_train))}


@pytest.fixture(autouse=True)
def _dann_cnn():
    import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
