"""Oxford Flowers-102 (8,189 photos, 102 classes) on ``torchvision.datasets.Flowers102``."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import ConcatDataset

from tl_lightning.data.base import ImageDataModule
from tl_lightning.data.decode import load_rgb
from tl_lightning.data.download import check_file, download_url, extract_archive

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


def _dataset_class():
    from torchvision.datasets import Flowers102

    return Flowers102


def flowers102_folder(root: str | Path) -> Path:
    """Where torchvision keeps Flowers-102 under ``root``."""
    return Path(root) / "flowers-102"


def flowers102_ready(root: str | Path) -> bool:
    """True when ``jpg/`` exists and both ``.mat`` files match torchvision's md5."""
    cls, folder = _dataset_class(), flowers102_folder(root)
    mats = [cls._file_dict[key] for key in ("label", "setid")]
    return (folder / "jpg").is_dir() and all(
        check_file(folder / name, md5, "md5") for name, md5 in mats
    )


def download_flowers102(root: str | Path) -> None:
    """Fetch ``102flowers.tgz`` and the two label files (md5-checked), extract the images safely."""
    cls, folder = _dataset_class(), flowers102_folder(root)
    if flowers102_ready(root):
        return
    prefix = cls._download_url_prefix
    if not (folder / "jpg").is_dir():
        name, md5 = cls._file_dict["image"]
        archive = download_url(prefix + name, folder / name, md5, "md5")
        extract_archive(archive, folder)  # -> folder/jpg/image_00001.jpg ...
    for key in ("label", "setid"):
        name, md5 = cls._file_dict[key]
        download_url(prefix + name, folder / name, md5, "md5")


class Flowers102DataModule(ImageDataModule):
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
        super().__init__(*args, **kwargs)
        self.root = Path(root)
        self._splits: dict = {}

    @property
    def class_names(self) -> list[str]:
        return list(FLOWERS102_CLASSES)

    def prepare_data(self) -> None:
        if self.hparams.download:
            download_flowers102(self.root)

    def _split(self, split: str):
        """The torchvision dataset of one official split (loaded once, no transform)."""
        if split not in self._splits:
            if not flowers102_ready(self.root):
                hint = (
                    "call prepare_data() first (the Trainer does)"
                    if self.hparams.download
                    else "set download: true"
                )
                raise FileNotFoundError(
                    f"Flowers-102 not found (or its .mat files corrupted) under "
                    f"'{flowers102_folder(self.root)}'; {hint}, or point root at the folder holding flowers-102"
                )
            cls = _dataset_class()
            kwargs = {"loader": load_rgb} if "loader" in inspect.signature(cls).parameters else {}
            self._splits[split] = cls(str(self.root), split=split, download=False, **kwargs)
        return self._splits[split]

    def _view(self, split: str, transform):
        """A shallow copy of a split with its own transform (train and val may share files)."""
        view = copy.copy(self._split(split))
        view.transform = transform
        return view

    def _train_splits(self) -> list[str]:
        return ["train", "val"] if self.hparams.train_on_trainval else ["train"]

    def train_labels(self) -> np.ndarray:
        return np.concatenate(
            [np.asarray(self._split(s)._labels, dtype=np.int64) for s in self._train_splits()]
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate"):
            parts = [self._view(s, self.train_transform()) for s in self._train_splits()]
            self.train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
            self.val_set = self._view("val", self.eval_transform())
            rank_zero_info(
                f"Flowers-102: train on {'+'.join(self._train_splits())} ({len(self.train_set)} images), "
                f"val {len(self.val_set)}"
            )
        if stage in (None, "test"):
            self.test_set = self._view("test", self.eval_transform())
