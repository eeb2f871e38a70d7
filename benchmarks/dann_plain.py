"""DANN in plain PyTorch (no Lightning, no tl-lightning model code): a cross-check of DANNModule.

Same data as ``benchmarks/dann.py`` (digits -> digits-M, the library's data functions only), the
paper's small CNN and schedules written out by hand: GRL ``lambda_p = 2/(1+exp(-10p)) - 1``, SGD
momentum 0.9, ``lr_p = 0.01/(1+10p)^0.75``, 64 source + 64 target images per step, BCE domain loss.
Every image of each half trains (labels of the source half only); target accuracy is measured on
the target half's images, the ones DANN saw without labels (transductive, as in the paper's
MNIST-M training set). ``--shift N`` moves each batch by a random offset of up to N pixels.

    python benchmarks/dann_plain.py --source-only & python benchmarks/dann_plain.py
    python benchmarks/dann_plain.py --shift 3          # with random shifts

It printed the same small DANN gain as DANNModule without augmentation (BENCHMARKS.md), which
pointed at the data rather than the library.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tl_lightning.data.digits import load_digits_images
from tl_lightning.data.digits_m import blend_with_photos, domain_part


class ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--shift", type=int, default=0, help="random shift of up to N px per batch")
    parser.add_argument("--source-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shifts = np.random.RandomState(args.seed)

    images, labels = load_digits_images(args.size)
    blended = blend_with_photos(images, seed=0)
    source, target = domain_part(labels, "source"), domain_part(labels, "target")

    def scale(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 127.5 - 1.0  # dann_cnn's [-1, 1]

    xs, ys = scale(images[source]), torch.from_numpy(labels[source])
    xt, yt = scale(blended[target]), torch.from_numpy(labels[target])
    features = nn.Sequential(
        nn.Conv2d(3, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 48, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
    )  # fmt: skip
    classifier = nn.Sequential(
        nn.Linear(768, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    domain = nn.Sequential(nn.Linear(768, 100), nn.ReLU(), nn.Linear(100, 1))
    modules = (features, classifier, domain)
    optimizer = torch.optim.SGD([p for m in modules for p in m.parameters()], lr=0.01, momentum=0.9)
    batch = 64
    domain_target = torch.cat([torch.zeros(batch), torch.ones(batch)])
    for step in range(args.steps):
        p = step / args.steps
        lam = 0.0 if args.source_only else 2 / (1 + math.exp(-10 * p)) - 1
        for group in optimizer.param_groups:
            group["lr"] = 0.01 / (1 + 10 * p) ** 0.75
        si, ti = torch.randint(len(xs), (batch,)), torch.randint(len(xt), (batch,))
        x = torch.cat([xs[si], xt[ti]])
        if args.shift:
            dx, dy = shifts.randint(0, 2 * args.shift + 1, 2)
            padded = F.pad(x, [args.shift] * 4, value=-1.0)
            x = padded[:, :, dy : dy + args.size, dx : dx + args.size]
        f = features(x)
        class_loss = F.cross_entropy(classifier(f[:batch]), ys[si])
        reversed_f = f.detach() if args.source_only else ReverseGradient.apply(f, lam)
        domain_logits = domain(reversed_f).squeeze(1)
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits, domain_target)
        optimizer.zero_grad()
        (class_loss + domain_loss).backward()
        optimizer.step()
        if step % 500 == 0 or step == args.steps - 1:
            with torch.no_grad():
                acc = (classifier(features(xt)).argmax(1) == yt).float().mean().item()
                domain_acc = ((domain_logits > 0).float() == domain_target).float().mean().item()
            print(
                f"step {step:5d}  class_loss {class_loss.item():.3f}  domain_loss "
                f"{domain_loss.item():.3f}  domain_acc {domain_acc:.2f}  lambda {lam:.2f}  "
                f"target acc {acc:.3f}",
                flush=True,
            )
    name = "source-only" if args.source_only else "DANN"
    print(f"{name}, seed {args.seed}, shift {args.shift}: target accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
