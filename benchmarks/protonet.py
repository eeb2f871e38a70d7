"""Prototypical Networks on the offline digits split: frozen prototypes vs episodic training vs easyfsl.

Setup: scikit-learn's handwritten digits rendered at 64 px, ImageNet EfficientNet-Lite0 (offline
weights), fp32. Train classes 0-4; test episodes (5-way, 15 queries per class, fixed seed) on the
unseen classes 5-9, from FewShotDataModule's test half of their images. Rows:

- frozen prototypes, cached: ``ProtoNetModule(freeze_backbone=True)`` through ``Trainer.test``
  (embeds the test split once, episodes look embeddings up);
- the same on cached embeddings without the Lightning loop (pure episode math);
- easyfsl ``PrototypicalNetworks`` on the same backbone and the same episodes, on images (it
  re-runs the backbone for every episode);
- ProtoNet trained episodically (5-way 5-shot, ``--train-episodes`` episodes on classes 0-4,
  Adam 5e-5), then tested like the frozen rows: its trained backbone frozen, the test split
  embedded once, the same 600 episodes (BatchNorm is in eval mode at test either way, so this
  equals testing on images; a paired comparison with the frozen row).

    .venv/bin/python benchmarks/protonet.py [--episodes 600] [--train-episodes 200] [--train-seeds 3]

Prints a markdown table: accuracy +- 95 % CI (1.96 sigma / sqrt(n)), seconds, episodes/s.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch
from lightning.pytorch import Trainer, seed_everything

from tl_lightning.data.digits import DigitsSource
from tl_lightning.data.episodes import EpisodicBatchSampler
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.modules.protonet import (
    ProtoNetModule,
    class_prototypes,
    confidence_interval,
    prototype_logits,
    remap_labels,
)

LIGHTNING = "frozen prototypes, cached embeddings (Trainer.test)"
MATH = "frozen prototypes, cached embeddings (episode math only)"
EASYFSL = "easyfsl PrototypicalNetworks, frozen, on images"
QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def datamodule(
    shot: int, episodes: int, train_episodes: int = 1, seed: int = 0
) -> FewShotDataModule:
    """Test episodes are fixed by ``seed`` (0 for every test); a training seed changes its episodes."""
    dm = FewShotDataModule(
        DigitsSource(),
        backbone="efficientnet_lite0",
        image_size=64,
        way=5,
        shot=shot,
        query=15,
        train_query=5,
        train_episodes=train_episodes,
        test_episodes=episodes,
        val_episodes=20,
        seed=seed,
    )
    dm.setup("fit")
    return dm


def test_sampler(dm: FewShotDataModule) -> EpisodicBatchSampler:
    """The exact episodes FewShotDataModule's test loader draws (same seed, same layout)."""
    return EpisodicBatchSampler(
        dm.split_labels("test"),
        dm.way,
        dm.shot,
        dm.query,
        dm.hparams.test_episodes,
        seed=dm.hparams.seed + 2,
        reseed_each_epoch=False,
    )


def lightning_test(model: ProtoNetModule, dm: FewShotDataModule) -> tuple[float, float, float]:
    start = time.perf_counter()
    Trainer(**QUIET).test(model, dm, verbose=False)
    return model.test_results["acc"], model.test_results["acc_ci95"], time.perf_counter() - start


def cached_episodes(model: ProtoNetModule, dm: FewShotDataModule) -> tuple[float, float, float]:
    """Embed the test split once, then run every episode on the embeddings."""
    start = time.perf_counter()
    model.eval()
    feats = model.embed_dataset(dm.test_set)
    labels = torch.as_tensor(dm.split_labels("test"))
    accs = []
    k = dm.way * dm.shot
    for ep in test_sampler(dm):
        idx = torch.tensor(ep)
        _, s, q = remap_labels(labels[idx[:k]], labels[idx[k:]])
        logits = prototype_logits(feats[idx[k:]], class_prototypes(feats[idx[:k]], s, dm.way))
        accs.append((logits.argmax(1) == q).float().mean())
    mean, ci = confidence_interval(torch.stack(accs))
    return mean, ci, time.perf_counter() - start


@torch.no_grad()
def easyfsl_episodes(model: ProtoNetModule, dm: FewShotDataModule) -> tuple[float, float, float]:
    """easyfsl's PrototypicalNetworks over the same backbone and episodes, on images."""
    from easyfsl.methods import PrototypicalNetworks

    net = PrototypicalNetworks(model.backbone).eval()
    start = time.perf_counter()
    accs = []
    k = dm.way * dm.shot
    for ep in test_sampler(dm):
        x = torch.stack([dm.test_set[i][0] for i in ep])
        y = torch.as_tensor(dm.split_labels("test")[ep])
        _, s, q = remap_labels(y[:k], y[k:])  # easyfsl needs 0..N-1 labels (else NaN prototypes)
        net.process_support_set(x[:k], s)
        accs.append((net(x[k:]).argmax(1) == q).float().mean())
    mean, ci = confidence_interval(torch.stack(accs))
    return mean, ci, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument(
        "--image-episodes", type=int, default=100, help="for rows running the backbone per episode"
    )
    parser.add_argument("--train-episodes", type=int, default=200)
    parser.add_argument(
        "--lr",
        type=float,
        default=5e-5,
        help="Adam LR of episodic training (1e-4 helped 1-shot but cost 5-shot; 3e-5 the reverse)",
    )
    parser.add_argument(
        "--train-seeds", type=int, default=1, help="episodic trainings, seeds 0, 1, ..."
    )
    parser.add_argument("--skip-easyfsl", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    n, n_img = args.episodes, args.image_episodes

    rows: list[tuple[str, int, int, float, float, float]] = []  # name, shot, episodes, acc, ci, s
    frozen = ProtoNetModule(backbone="efficientnet_lite0", num_classes=5, freeze_backbone=True)
    frozen_accs = {}
    for shot in (1, 5):
        dm = datamodule(shot, n)
        rows.append((LIGHTNING, shot, n, *lightning_test(frozen, dm)))
        frozen_accs[shot] = frozen.test_episode_accuracies
        rows.append((MATH, shot, n, *cached_episodes(frozen, dm)))
        if not args.skip_easyfsl:
            rows.append((EASYFSL, shot, n_img, *easyfsl_episodes(frozen, datamodule(shot, n_img))))

    gains: dict[int, list[tuple[float, float]]] = {1: [], 5: []}  # per training seed
    for seed in range(args.train_seeds):
        seed_everything(seed)
        trained = ProtoNetModule(
            backbone="efficientnet_lite0",
            num_classes=5,
            optimizer=lambda p: torch.optim.Adam(p, lr=args.lr),
        )
        train_dm = datamodule(5, n, train_episodes=args.train_episodes, seed=seed)
        start = time.perf_counter()
        Trainer(max_epochs=1, limit_val_batches=0, **QUIET).fit(trained, train_dm)
        train_s = time.perf_counter() - start
        name = (
            f"ProtoNet trained episodically ({args.train_episodes} episodes, seed {seed}, "
            f"{train_s:.0f} s), cached test"
        )
        tested = ProtoNetModule(backbone="efficientnet_lite0", num_classes=5, freeze_backbone=True)
        tested.load_state_dict(trained.state_dict())
        for shot in (1, 5):
            rows.append((name, shot, n, *lightning_test(tested, datamodule(shot, n))))
            # same episodes for both models: the per-episode difference has a much tighter CI
            diff = tested.test_episode_accuracies - frozen_accs[shot]
            gains[shot].append(tuple(float(v) for v in confidence_interval(diff)))

    print("\n5-way, 15 queries per class, digits classes 5-9 (EfficientNet-Lite0, 64 px, fp32)\n")
    print("| method | shot | episodes | accuracy % (+- 95% CI) | seconds | episodes/s |")
    print("|---|---|---|---|---|---|")
    for name, shot, episodes, acc, ci, t in rows:
        print(
            f"| {name} | {shot} | {episodes} | {100 * acc:.2f} +- {100 * ci:.2f} | {t:.1f} | {episodes / t:.1f} |"
        )
    per_600 = {(name, shot): 600 * t / episodes for name, shot, episodes, _, _, t in rows}
    for shot in (1, 5):
        if (EASYFSL, shot) in per_600:
            easy, lit, math_ = (per_600[(k, shot)] for k in (EASYFSL, LIGHTNING, MATH))
            print(
                f"\n{shot}-shot, seconds per 600 episodes (easyfsl extrapolated from its rate): easyfsl {easy:.0f}, "
                f"cached Trainer.test {lit:.1f} ({easy / lit:.0f}x faster), "
                f"cached episode math {math_:.1f} ({easy / math_:.0f}x faster)"
            )
    for shot, per_seed in gains.items():
        each = ", ".join(f"{100 * g:+.2f} +- {100 * ci:.2f}" for g, ci in per_seed)
        mean = 100 * sum(g for g, _ in per_seed) / len(per_seed)
        print(
            f"\n{shot}-shot, trained - frozen on the same {n} episodes, per training seed "
            f"(paired 95% CI): {each}; mean {mean:+.2f} points"
        )
    print(
        "\nPaper (Snell et al. 2017, Conv-4, 5-way 1/5-shot): Omniglot 98.8 / 99.7, miniImageNet 49.42 / 68.20"
    )


if __name__ == "__main__":
    main()
