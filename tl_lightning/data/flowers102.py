"""Oxford Flowers-102 (8,189 photos, 102 classes) on ``torchvision.datasets.Flowers102``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.data.classification import ClassificationDataModule
from tl_lightning.data.download import check_file, download_url, extract_archive
from tl_lightning.data.source import ImageSource, LabelledImages

# Names of labels 0..101 (``imagelabels.mat`` holds 1..102), as torchvision lists them.
FLOWERS102_CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink-yellow dahlia?", "cautleya spicata", "japanese anemone",
    "black-eyed susan", "silverbush", "californian poppy", "osteospermum", "spring crocus",
    "bearded iris", "windflower", "tree poppy", "gazania", "azalea", "water lily", "rose",
    "thorn apple", "morning glory", "passion flower", "lotus", "toad lily", "anthurium", "frangipani",
    "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper",
    "blackberry lily",
]  # fmt: skip


# Where the files are and their md5s (as torchvision 0.29's Flowers102 lists them).
FLOWERS102_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS102_FILES = {  # name, md5
    "image": ("102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
    "label": ("imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
    "setid": ("setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c"),
}
SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # in setid.mat


def flowers102_folder(root: str | Path) -> Path:
    """Where Flowers-102 lives under ``root`` (torchvision's layout)."""
    return Path(root) / "flowers-102"


def flowers102_ready(root: str | Path) -> bool:
    """True when ``jpg/`` exists and both ``.mat`` files match their md5."""
    folder = flowers102_folder(root)
    mats = [FLOWERS102_FILES[key] for key in ("label", "setid")]
    return (folder / "jpg").is_dir() and all(
        check_file(folder / name, md5, "md5") for name, md5 in mats
    )


def download_flowers102(root: str | Path) -> None:
    """Fetch ``102flowers.tgz`` and the two label files (md5-checked), extract the images safely."""
    folder = flowers102_folder(root)
    if flowers102_ready(root):
        return
    if not (folder / "jpg").is_dir():
        name, md5 = FLOWERS102_FILES["image"]
        archive = download_url(FLOWERS102_URL + name, folder / name, md5, "md5")
        extract_archive(archive, folder)  # -> folder/jpg/image_00001.jpg ...
    for key in ("label", "setid"):
        name, md5 = FLOWERS102_FILES[key]
        download_url(FLOWERS102_URL + name, folder / name, md5, "md5")


def load_flowers102(root: str | Path, download: bool = False) -> LabelledImages:
    """All 8,189 Flowers-102 images (files, decoded when read) with the official splits.

    Labels are ``imagelabels.mat - 1``; ``setid.mat`` lists the image ids of each split.
    """
    from scipy.io import loadmat

    folder = flowers102_folder(root)
    if not flowers102_ready(root):
        hint = "call prepare_data() first (the Trainer does)" if download else "set download: true"
        raise FileNotFoundError(
            f"Flowers-102 not found (or its .mat files corrupted) under '{folder}'; {hint}, "
            f"or point root at the folder holding flowers-102"
        )
    labels = loadmat(folder / FLOWERS102_FILES["label"][0], squeeze_me=True)["labels"]
    set_ids = loadmat(folder / FLOWERS102_FILES["setid"][0], squeeze_me=True)
    files, targets, splits = [], [], {}
    for split, key in SPLIT_KEYS.items():
        ids = np.atleast_1d(set_ids[key]).astype(np.int64)
        splits[split] = np.arange(len(files), len(files) + len(ids))
        files += [folder / "jpg" / f"image_{i:05d}.jpg" for i in ids]
        targets.append(np.asarray(labels, dtype=np.int64)[ids - 1] - 1)
    return LabelledImages(files, np.concatenate(targets), list(FLOWERS102_CLASSES), splits)


class Flowers102Source(ImageSource):
    """Flowers-102 as a source, with its official splits (train 1,020 / val 1,020 / test 6,149).

    Args:
        root: folder holding ``flowers-102``. download: fetch it (md5-checked) when missing.
        train_on_trainval: train on train+val (validation stays the official val split).

    Example:
        >>> source = Flowers102Source(root="data", train_on_trainval=True)
        >>> len(source.class_names), source.class_names[0], round(source.few_shot_classes[0] * 102)
        (102, 'pink primrose', 62)
    """

    few_shot_classes = (62 / 102, 20 / 102)  # FewShotDataModule: a seeded 62/20/20 class split

    def __init__(self, root: str = "data", download: bool = True, train_on_trainval: bool = False):
        self.root, self.download, self.train_on_trainval = root, download, train_on_trainval

    @property
    def class_names(self) -> list[str]:
        return list(FLOWERS102_CLASSES)

    def prepare(self) -> None:
        if self.download:
            download_flowers102(self.root)

    def load(self, image_size: int) -> LabelledImages:
        return load_flowers102(self.root, self.download)

    def splits(self, images: LabelledImages, seed: int) -> dict[str, np.ndarray]:
        official = images.splits
        train_on = ["train", "val"] if self.train_on_trainval else ["train"]
        train = np.concatenate([official[s] for s in train_on])
        rank_zero_info(
            f"Flowers-102: train on {'+'.join(train_on)} ({len(train)} images), "
            f"val {len(official['val'])}"
        )
        return {"train": train, "val": official["val"], "test": official["test"]}


class Flowers102DataModule(ClassificationDataModule):
    """Flowers-102 with its official splits: train 1,020 / val 1,020 / test 6,149 (10 per class in train).

    Data lives in ``{root}/flowers-102`` (``jpg/``, ``imagelabels.mat``, ``setid.mat``, and the
    downloaded ``102flowers.tgz``). Labels are 0..101; :data:`FLOWERS102_CLASSES` names them.

    Args:
        root: folder holding ``flowers-102``.
        download: fetch the archive (~345 MB) and label files, md5-checked, when missing.
        train_on_trainval: train on train+val (2,040 images), the usual protocol for the final
            run once hyper-parameters are chosen; val/acc is then measured on seen images and
            only the test split is an honest estimate (``tl-lightning test``).

    Example:
        >>> dm = Flowers102DataModule(root="data", backbone="resnet18", weights=None)
        >>> dm.num_classes, dm.class_names[0]
        (102, 'pink primrose')
    """

    def __init__(
        self,
        *args,
        root: str = "data",
        download: bool = True,
        train_on_trainval: bool = False,
        **kwargs,
    ):
        super().__init__(Flowers102Source(root, download, train_on_trainval), *args, **kwargs)
