"""The data description equals an independent count of the folder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tl_lightning.advisor.describe import describe_data
from tl_lightning.data import ImageFolderDataModule


def test_description_matches_an_independent_count(folder):
    dm = ImageFolderDataModule(str(folder.root), backbone="resnet18", weights=None, image_size=32)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    d = describe_data(dm)

    # independent: walk the folder we wrote; classes are the sorted subfolders
    classes = sorted(p.name for p in folder.root.iterdir() if p.is_dir())
    valid_per_class = Counter(Path(p).parent.name for p in folder.sizes)
    assert d.class_names == classes
    assert sum(d.splits.values()) == len(folder.sizes)
    assert set(d.splits) == {"train", "val", "test"}
    # the train split, read item by item (not through describe_data)
    train_classes = [dm.train_set[i][1] for i in range(len(dm.train_set))]
    assert d.splits["train"] == len(train_classes)
    assert d.train_per_class == [train_classes.count(i) for i in range(len(classes))]
    assert d.imbalance == max(d.train_per_class) / min(d.train_per_class)
    assert all(d.train_per_class[i] <= valid_per_class[c] for i, c in enumerate(classes))
    # sizes of the training files, from what we wrote
    expected = Counter(folder.sizes[str(p)] for p in dm.train_set.paths)
    assert d.image_sizes == dict(expected)
    assert sorted(p for p, _ in d.broken) == sorted(folder.broken)
    assert all("undecodable" in why or "truncated" in why for _, why in d.broken)


def test_in_memory_digits_sizes_and_counts():
    from sklearn.datasets import load_digits

    from tl_lightning.data import DigitsDataModule

    dm = DigitsDataModule(backbone="resnet18", weights=None, image_size=24)
    dm.setup("fit")
    d = describe_data(dm)
    assert d.image_sizes == {(24, 24): d.splits["train"]}
    assert sum(d.splits.values()) == len(load_digits().target)
    assert d.broken == [] and d.size_summary() == "24x24"
