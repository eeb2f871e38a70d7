"""FewShotDataModule takes a source and splits its classes; the old ``dataset`` spelling still
gives the very same episodes, with a FutureWarning naming the ``source:`` spelling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data.test_bad_data import make_folder
from tl_lightning.data.cifar10 import CIFAR10Source
from tl_lightning.data.digits import DigitsSource
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.data.flowers102 import Flowers102Source
from tl_lightning.data.image_folder import ImageFolderSource

EPISODES = {"backbone": "conv4", "image_size": 16, "way": 2, "shot": 1, "query": 1,
            "train_episodes": 3, "val_episodes": 3, "test_episodes": 3}  # fmt: skip


def episodes(dm) -> list[list[torch.Tensor]]:
    dm.prepare_data()
    dm.setup("fit")
    return [list(ep) for split in ("train", "val", "test")
            for ep in getattr(dm, f"{split}_dataloader")()]  # fmt: skip


def same_episodes(a, b) -> bool:
    return len(a) == len(b) > 0 and all(
        torch.equal(x, y) for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True)
    )


@pytest.mark.parametrize("kind", ["digits", "cifar10", "flowers102", "folder"])
def test_source_gives_the_episodes_the_old_dataset_name_gave(
    kind, cifar10_patched, flowers102_patched, tmp_path
):
    folder = make_folder(tmp_path / "shots", {f"c{c}": 5 for c in range(10)})
    roots = {
        "cifar10": cifar10_patched.root,
        "flowers102": flowers102_patched.root,
        "folder": folder,
    }
    root = str(roots.get(kind, "data"))
    sources = {
        "digits": lambda: DigitsSource(),
        "cifar10": lambda: CIFAR10Source(root, download=False),
        "flowers102": lambda: Flowers102Source(root, download=False),
        "folder": lambda: ImageFolderSource(root),
    }
    new = FewShotDataModule(sources[kind](), **EPISODES)
    with pytest.warns(FutureWarning, match=f"dataset='{kind}'.*source: {{class_path: tl_lightning"):
        old = FewShotDataModule(dataset=kind, root=root, **EPISODES)
    with pytest.warns(FutureWarning, match="deprecated"):
        positional = FewShotDataModule(kind, root, **EPISODES)  # the old first argument
    assert new.class_splits() == old.class_splits() == positional.class_splits()
    assert same_episodes(episodes(new), episodes(old))
    assert same_episodes(episodes(new), episodes(positional))


def test_default_class_split_is_the_sources_data():
    class SixDigits(DigitsSource):  # a source of 6 classes, split in halves by default
        @property
        def class_names(self):
            return [str(i) for i in range(6)]

    assert FewShotDataModule(SixDigits(), backbone="conv4").class_splits() == {
        "train": [0, 1, 2], "val": [3, 4, 5], "test": [3, 4, 5],
    }  # fmt: skip

    class Shuffled(DigitsSource):
        few_shot_classes = (0.5, 0.3)

    seed = 7
    perm = np.random.default_rng(seed).permutation(10).tolist()  # train 5, val 3, test 2
    expected = {"train": sorted(perm[:5]), "val": sorted(perm[5:8]), "test": sorted(perm[8:])}
    assert FewShotDataModule(Shuffled(), backbone="conv4", seed=seed).class_splits() == expected
    # the default source is the digits, without a warning
    assert FewShotDataModule(backbone="conv4").class_splits()["train"] == [0, 1, 2, 3, 4]


def test_folder_source_is_scanned_like_the_classification_folders(tmp_path):
    root = make_folder(tmp_path / "shots", {f"c{c}": 4 for c in range(10)})
    broken = root / "c3" / "zz_broken.png"
    broken.write_bytes(b"not a png")
    (root / ".hidden").mkdir()  # never a class
    dm = FewShotDataModule(ImageFolderSource(str(root)), **EPISODES)
    assert dm.class_names == [f"c{c}" for c in range(10)]
    dm.setup("fit")
    paths = [p for split in ("train", "val", "test") for p in getattr(dm, f"{split}_set").paths]
    assert broken not in paths and len(paths) == 40  # skipped by the scan, listed in skipped.csv
    assert str(broken.relative_to(root)) in (root / "skipped.csv").read_text()


def test_hparams_hold_the_source_as_plain_values_and_root_goes_with_dataset_only(tmp_path):
    dm = FewShotDataModule(Flowers102Source("flowers", download=False), backbone="conv4")
    hp = dict(dm.hparams_initial)
    assert hp["source"] == {
        "class_path": "tl_lightning.data.flowers102.Flowers102Source",
        "init_args": {"root": "flowers", "download": False, "train_on_trainval": False},
    }
    torch.save(hp, tmp_path / "hp.pt")
    assert torch.load(tmp_path / "hp.pt", weights_only=True) == hp
    with pytest.raises(ValueError, match="root and download only go with the deprecated dataset"):
        FewShotDataModule(DigitsSource(), root="data")
    with pytest.raises(ValueError, match="either source or the deprecated dataset"):
        FewShotDataModule(DigitsSource(), dataset="digits")
    with pytest.raises(ValueError, match="source must be an ImageSource"):
        FewShotDataModule(source=42)
