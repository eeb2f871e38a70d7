"""pytorch-adapt's DANN on the setting of ``benchmarks/dann.py`` (dann_cnn): a peer implementation.

    python benchmarks/dann_pytorch_adapt.py --pytorch-adapt-site DIR             # 3000 steps, seed 0
    python benchmarks/dann.py --full --pytorch-adapt-site DIR                     # as a peer row

pytorch-adapt pins an old torchmetrics, so it lives outside the project's environment:
``pip install --no-deps --target DIR pytorch-adapt pytorch-metric-learning==1.6.3``; DIR comes
from ``--pytorch-adapt-site`` or ``$PYTORCH_ADAPT_SITE`` (or pytorch-adapt is installed).

Everything but the training step is ``run()``'s DANN run: the same data (``digits_pair``, the same
source and target train loaders, the target test split for the accuracy), the same networks with
the same initial weights (built by ``DANNModule`` after ``seed_everything(seed)``: G = the dann_cnn
backbone, C = the 100-100-10 label head, D = the 100-1 domain head), SGD momentum 0.9 with
``lr_p = 0.01/(1+10p)^0.75`` per step. The step is pytorch-adapt's: its ``DANN`` adapter
(``DANNHook``: BCE domain loss, source 0 / target 1, through its ``GradientReversal``, whose weight
is set to ``lambda_p = 2/(1+exp(-10p)) - 1`` before every step) and its ``Optimizers`` and
``LRSchedulers`` containers. Two settings differ from pytorch-adapt's defaults: the GRL weight
schedule (its default is a constant 1), and the loss: its default weighter averages the three
losses, ``(class + src_domain + target_domain) / 3``; here a ``SumWeighter`` gives
``class + (src_domain + target_domain) / 2``, our (and the paper's) loss (``--mean-weighter`` keeps
the default). One step then updates the weights as DANNModule's does (checked to 1e-8 on one
batch); pytorch-adapt only runs G on the source and target halves separately where DANNModule runs
one batch of both (the same for this net: no BatchNorm).

Measured (3000 steps, 1 thread, one run at a time): seeds 0-2 gave 0.545, 0.528, 0.522 target
accuracy (0.532 +- 0.012), about 280 s a run; with ``--mean-weighter`` seed 0 gave 0.444.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from dann import seeded_start
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tl_lightning.modules.dann import dann_lr_factor
from tl_lightning.modules.grl import grl_lambda

SITE_ENV = "PYTORCH_ADAPT_SITE"
INSTALL = "pip install --no-deps --target DIR pytorch-adapt pytorch-metric-learning==1.6.3"


def import_pytorch_adapt(site: str | None = None) -> None:
    """Import pytorch_adapt, from ``site`` or ``$PYTORCH_ADAPT_SITE`` first when given."""
    site = site or os.environ.get(SITE_ENV)
    if site and site not in sys.path:
        sys.path.insert(0, site)
    try:
        import pytorch_adapt  # noqa: F401
    except ImportError as e:
        where = f"from {site}" if site else "(no --pytorch-adapt-site DIR or ${SITE_ENV} given)"
        raise SystemExit(
            f"pytorch-adapt cannot be imported {where}: {e}\n"
            f"Install it outside the project's environment with `{INSTALL}` "
            f"and pass --pytorch-adapt-site DIR (or set {SITE_ENV}=DIR)."
        ) from e


def run_pytorch_adapt(
    seed: int,
    steps: int,
    image_size: int,
    batch_size: int,
    threads: int,
    augment: str,
    mean_weighter: bool = False,
) -> tuple[float, float]:
    """Train one pytorch-adapt DANN; returns (target-test acc, seconds)."""
    import_pytorch_adapt()
    from pytorch_adapt.adapters import DANN
    from pytorch_adapt.containers import LRSchedulers, Models, Optimizers
    from pytorch_adapt.hooks import FeaturesForDomainLossHook, GradientReversalHook
    from pytorch_adapt.weighters import MeanWeighter, SumWeighter

    dm, net = seeded_start("dann_cnn", seed, image_size, batch_size, threads, augment)
    # pytorch-adapt's D returns [B] logits (its Discriminator squeezes): flatten our [B, 1]
    models = Models(
        {"G": net.backbone, "C": net.head, "D": nn.Sequential(net.domain_head, nn.Flatten(0))}
    )
    grl = GradientReversalHook(weight=0.0, apply_to=FeaturesForDomainLossHook().out_keys)
    domain_half = {"src_domain_loss": 0.5, "target_domain_loss": 0.5}
    adapter = DANN(
        models=models,
        optimizers=Optimizers((torch.optim.SGD, {"lr": 0.01, "momentum": 0.9})),
        lr_schedulers=LRSchedulers((LambdaLR, {"lr_lambda": lambda i: dann_lr_factor(i / steps)})),
        hook_kwargs={
            "gradient_reversal": grl,
            "weighter": MeanWeighter() if mean_weighter else SumWeighter(weights=domain_half),
        },
    )
    start = time.perf_counter()
    dm.setup("fit")
    loader = dm.train_dataloader()  # {"source": (x, y), "target": x}, as DANNModule gets them
    models.train()
    step, epoch = 0, 0
    while step < steps:
        for part in loader.flattened:  # what Lightning does at each epoch start
            if hasattr(part.sampler, "set_epoch"):
                part.sampler.set_epoch(epoch)
        for batch, _, _ in loader:
            grl.fn.update_weight(grl_lambda(step / steps))
            (xs, ys), xt = batch["source"], batch["target"]
            adapter.training_step(
                {
                    "src_imgs": xs,
                    "src_labels": ys,
                    "target_imgs": xt,
                    "src_domain": torch.zeros(len(xs)),
                    "target_domain": torch.ones(len(xt)),
                }
            )
            adapter.lr_schedulers.step("per_step")
            step += 1
            if step == steps:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    dm.setup("test")
    models.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits = adapter.inference(batch[0])["logits"]
            correct += int((logits.argmax(1) == batch[1]).sum())
            total += len(batch[1])
    return correct / total, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pytorch-adapt-site", help=f"folder holding pytorch_adapt (or ${SITE_ENV})"
    )
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64, help="per domain")
    parser.add_argument("--augment", default="basic")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--mean-weighter",
        action="store_true",
        help="pytorch-adapt's default loss (class + 2 domain losses) / 3 instead of ours",
    )
    args = parser.parse_args()
    if args.pytorch_adapt_site:
        os.environ[SITE_ENV] = args.pytorch_adapt_site
    import_pytorch_adapt()
    acc, seconds = run_pytorch_adapt(
        args.seed,
        args.steps,
        args.image_size,
        args.batch_size,
        args.threads,
        args.augment,
        args.mean_weighter,
    )
    print(
        f"pytorch-adapt DANN, seed {args.seed}, {args.steps} steps: target acc {acc:.3f}, {seconds:.0f}s"
    )


if __name__ == "__main__":
    main()
