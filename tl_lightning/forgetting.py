"""Forgetting, measured: how far fine-tuning moved a backbone away from what it was pretrained for.

Three measures on a fixed *reference set* of images, against the frozen :class:`StartingPoint`:

- ``source_agreement``: the fraction of images on which the current backbone + the original (source)
  classifier predicts the same source class as the original network. 1.0 at the start; needs no labels.
- ``source_acc`` and ``forgetting = source_acc(start) - source_acc(now)`` when the images have
  source labels (``source_dir/<ImageNet class name>/*.jpg``).
- ``cka_drift = 1 - linear CKA`` (Kornblith et al. 2019) between the starting and the current
  pooled features: 0 for unchanged features (up to rotation and scale), toward 1 as they decorrelate.

The starting network's outputs on the reference set are computed once and cached.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_lightning.backbones.backbone import Backbone, DataConfig
from tl_lightning.errors import DataError

# The real photos scikit-image and scikit-learn ship: the offline default reference set.
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "coins",
    "camera",
    "brick",
    "grass",
    "gravel",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class StartingPoint(nn.Module):
    """A frozen copy of the network a run starts from: backbone, new head and source classifier.

    Always in eval mode (its BatchNorm statistics never move) and never trained. L2-SP pulls toward
    its weights, LwF distils its source predictions, WiSE-FT interpolates toward it.

    Example:
        >>> from tl_lightning import build_backbone
        >>> bb = build_backbone("resnet18", weights=None)
        >>> start = StartingPoint(bb, nn.Linear(512, 10), source_head=None)
        >>> any(p.requires_grad for p in start.parameters())
        False
    """

    def __init__(self, backbone: Backbone, head: nn.Module, source_head: nn.Linear | None):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = copy.deepcopy(head)
        self.source_head = source_head
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> StartingPoint:
        return super().train(False)  # frozen means frozen, whatever Lightning calls

    @torch.no_grad()
    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.source_head is None:
            raise ValueError("this starting point has no source classifier (random init or a cut backbone)")
        return self.source_head(self.backbone(x).float())


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA between feature matrices ``[N, D1]`` and ``[N, D2]``: 1 for identical up to rotation/scale.

    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``.
    """
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = (y.T @ x).square().sum()
    return (cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-30)).float()


def _normalise(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def _photos() -> list[np.ndarray]:
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for name in SKIMAGE_PHOTOS:
        pic = np.asarray(getattr(skimage.data, name)())
        pic = np.repeat(pic[..., None], 3, axis=2) if pic.ndim == 2 else pic[..., :3]
        out.append(pic)
    sample = load_sample_images()
    for name, pic in zip(sample.filenames, sample.images):
        if Path(name).name in SKLEARN_PHOTOS:
            out.append(np.asarray(Image.fromarray(pic).convert("RGB")))
    return out


def default_reference_images(num_images: int = 64, image_size: int = 224, seed: int = 0) -> torch.Tensor:
    """Seeded random crops of the real photos scikit-image and scikit-learn ship, uint8 ``[N, 3, S, S]``.

    Crops cover 10-100% of a photo's area with aspect ratio 3/4-4/3 (RandomResizedCrop's range), so
    the set holds whole scenes and close-ups; the same ``seed`` always gives the same images.
    """
    pics = [torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in _photos()]
    rng = np.random.default_rng(seed)
    out = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
    for i in range(num_images):
        pic = pics[i % len(pics)]  # every photo in turn, so small sets still see them all
        h, w = pic.shape[1:]
        area = h * w * rng.uniform(0.1, 1.0)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / ratio))))
        cw = int(min(w, round(np.sqrt(area * ratio))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = pic[:, top : top + ch, left : left + cw].float().unsqueeze(0)
        resized = F.interpolate(crop, size=(image_size, image_size), mode="bilinear", antialias=True)
        out[i] = resized[0].round().clamp(0, 255).to(torch.uint8)
    return out


def load_reference_folder(
    source_dir: str | Path, image_size: int, class_names: list[str] | None, crop_pct: float = 0.875
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images of ``source_dir`` (resize + centre crop), uint8 ``[N, 3, S, S]``, and their source labels.

    Sub-folders named after source classes (``class_names``, e.g. ImageNet's ``tabby``) give labels;
    a flat folder of images gives none.
    """
    from PIL import Image

    root = Path(source_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"source_dir '{root}' is not a folder of images")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if subdirs:
        lookup = {n.lower(): i for i, n in enumerate(class_names or [])}
        unknown = [d.name for d in subdirs if d.name.lower() not in lookup]
        if unknown:
            raise DataError(
                f"source_dir '{root}' has class folders {unknown[:5]} that are not source classes "
                f"of the backbone (e.g. {list(lookup)[:3]}); name folders by source class or use a flat folder"
            )
        items = [(f, lookup[d.name.lower()]) for d in subdirs for f in sorted(d.iterdir())]
    else:
        items = [(f, -1) for f in sorted(root.iterdir())]
    items = [(f, y) for f, y in items if f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"source_dir '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    resize = int(round(image_size / crop_pct))
    images = []
    for f, _ in items:
        with Image.open(f) as im:
            pic = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
        h, w = pic.shape[1:]
        scale = resize / min(h, w)
        pic = F.interpolate(pic[None], size=(max(resize, round(h * scale)), max(resize, round(w * scale))), mode="bilinear", antialias=True)[0]
        top, left = (pic.shape[1] - image_size) // 2, (pic.shape[2] - image_size) // 2
        images.append(pic[:, top : top + image_size, left : left + image_size].round().clamp(0, 255).to(torch.uint8))
    labels = torch.tensor([y for _, y in items]) if subdirs else None
    return torch.stack(images), labels


class ReferenceSet:
    """Fixed images on which forgetting is measured, with the starting network's outputs cached.

    Example:
        >>> ref = ReferenceSet.default(backbone.data_config, num_images=32, image_size=96)
        >>> ref.measure(model.backbone, model.start)        # doctest: +SKIP
        {'source_agreement': 1.0, 'cka_drift': 0.0}
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 32):
        self.images = images  # normalised float [N, 3, S, S]
        self.labels = labels
        self.batch_size = batch_size
        self._start: tuple[int, torch.Tensor, torch.Tensor | None, float | None] | None = None

    @classmethod
    def default(cls, config: DataConfig, num_images: int = 64, image_size: int | None = None, seed: int = 0, batch_size: int = 32) -> ReferenceSet:
        raw = default_reference_images(num_images, image_size or config.input_size, seed)
        return cls(_normalise(raw, config), None, batch_size)

    @classmethod
    def from_folder(cls, source_dir: str | Path, config: DataConfig, class_names: list[str] | None, image_size: int | None = None, batch_size: int = 32) -> ReferenceSet:
        raw, labels = load_reference_folder(source_dir, image_size or config.input_size, class_names, config.crop_pct)
        return cls(_normalise(raw, config), labels, batch_size)

    @torch.no_grad()
    def _run(self, backbone: nn.Module, source_head: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        was_training = backbone.training
        backbone.eval()
        device = next(backbone.parameters()).device
        feats = []
        # fp32 outside any autocast: a measure must not depend on the training precision
        with torch.autocast(device.type, enabled=False):
            for i in range(0, len(self.images), self.batch_size):
                feats.append(backbone(self.images[i : i + self.batch_size].to(device)).float())
        backbone.train(was_training)
        feats_t = torch.cat(feats)
        preds = source_head.to(device)(feats_t).argmax(1).cpu() if source_head is not None else None
        return feats_t.cpu(), preds

    def measure(self, backbone: nn.Module, start: StartingPoint) -> dict[str, float]:
        """``source_agreement``, ``cka_drift`` and, with labels, ``source_acc`` and ``forgetting``."""
        if self._start is None or self._start[0] != id(start):  # the start's outputs, once
            f0, p0 = self._run(start.backbone, start.source_head)
            acc0 = self._acc(p0)
            self._start = (id(start), f0, p0, acc0)
        _, f0, p0, acc0 = self._start
        f, p = self._run(backbone, start.source_head)
        out = {"cka_drift": float(1 - linear_cka(f0, f))}
        if p is not None:
            out["source_agreement"] = float((p == p0).float().mean())
        acc = self._acc(p)
        if acc is not None:
            out["source_acc"] = acc
            out["forgetting"] = acc0 - acc
        return out

    def _acc(self, preds: torch.Tensor | None) -> float | None:
        if preds is None or self.labels is None:
            return None
        return float((preds == self.labels).float().mean())
