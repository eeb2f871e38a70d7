"""How much the ImageNet teacher says about the digits at each image size (LwF's premise).

LwF distils the pretrained network's ImageNet outputs on the new images; when those outputs are
nearly uniform there is nothing to keep. For the digits (ID) and digits-M (OOD) test splits at
each size: the teacher's top-1 probability (mean, median), the median top-1/top-2 margin, the
entropy as a share of ln 1000 (plain and at LwF's temperature 2) and how many ImageNet classes
it predicts. Offline EfficientNet-Lite0 with its ImageNet classifier.

    python benchmarks/teacher_confidence.py --sizes 32 64 128 224 --threads 1
"""

from __future__ import annotations

import argparse
import math

import torch
from _common import add_threads_arg, apply_threads, print_header, print_table

from tl_lightning.backbones.registry import build_backbone
from tl_lightning.backbones.source_head import source_classifier
from tl_lightning.data import DigitsDataModule, DigitsMDataModule


def entropy_share(probs: torch.Tensor) -> float:
    """Mean entropy as a share of the uniform distribution's (ln of the number of classes)."""
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    return float(ent.mean() / math.log(probs.shape[-1]))


def teacher_probs(backbone, head, datamodule) -> torch.Tensor:
    datamodule.setup("test")
    with torch.no_grad():
        return torch.cat([head(backbone(x)).softmax(-1) for x, _ in datamodule.test_dataloader()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 224])
    add_threads_arg(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    print_header("ImageNet teacher's confidence on the digits, by image size")
    backbone = build_backbone("efficientnet_lite0", weights="DEFAULT").eval()
    head = source_classifier("efficientnet_lite0").eval()
    rows = []
    for name, cls in (("digits", DigitsDataModule), ("digits-M", DigitsMDataModule)):
        for size in args.sizes:
            dm = cls(backbone="efficientnet_lite0", image_size=size, augment="none", seed=0)
            p = teacher_probs(backbone, head, dm)
            top = p.topk(2, dim=-1).values
            soft = (p.clamp_min(1e-12).log() / 2).softmax(-1)  # LwF's temperature T = 2
            rows.append([
                name, size, f"{top[:, 0].mean():.3f}", f"{top[:, 0].median():.3f}",
                f"{(top[:, 0] - top[:, 1]).median():.4f}", f"{entropy_share(p):.3f}",
                f"{entropy_share(soft):.3f}", int(p.argmax(-1).unique().numel()),
            ])  # fmt: skip
    print_table(
        ["test split", "px", "top-1 mean", "top-1 median", "margin median", "entropy / ln 1000",
         "at T = 2", "ImageNet classes used"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
