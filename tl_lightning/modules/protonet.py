"""Prototypical Networks (Snell et al. 2017) on any Backbone: episodic training and evaluation.

A class is represented by its *prototype*, the mean embedding of its few labelled (support)
images; a query belongs to the nearest prototype. Logits are minus the squared Euclidean
distance (the paper's choice; a Bregman divergence, so the classifier is linear in the
embedding) or, optionally, a learnable temperature times the cosine similarity.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import CatMetric, MeanMetric
from tqdm.auto import tqdm

from tl_lightning.backbones import Backbone, BNPolicy, build_backbone
from tl_lightning.backbones import conv4 as _conv4  # noqa: F401  (registers the conv4 backbone)
from tl_lightning.errors import DataError
from tl_lightning.modules.base import TransferModule
from tl_lightning.modules.prototypes import (
    DISTANCES,
    PrototypeClassifier,
    class_prototypes,
    prototype_logits,
    remap_labels,
)

__all__ = [  # the prototype functions are importable from here too
    "ProtoNetModule",
    "predict_few_shot",
    "FewShotPrediction",
    "confidence_interval",
    "class_prototypes",
    "prototype_logits",
    "remap_labels",
]

# A frozen backbone is kept in eval mode on purpose; Lightning warns about that at fit start.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

def confidence_interval(accuracies: torch.Tensor) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))``: the 95 % interval of the mean episode accuracy."""
    n = accuracies.numel()
    mean = float(accuracies.float().mean())
    std = float(accuracies.float().std()) if n > 1 else 0.0
    return mean, 1.96 * std / math.sqrt(max(n, 1))


class ProtoNetModule(TransferModule):
    """Prototypical Networks: embedding = backbone (+ projection), classes = support-mean prototypes.

    Batches are episodes ``(support, support_labels, query, query_labels)`` (see
    :class:`~tl_lightning.data.few_shot.FewShotDataModule`); labels are any class ids and are
    remapped to ``0..N-1`` per episode, so training and evaluation way/shot/query may differ.
    The loss is cross-entropy of the query logits. BatchNorm runs in eval mode at
    validation/test (Lightning's ``model.eval()``).

    ``freeze_backbone=True`` gives the pretrained-prototype baseline: no training needed
    (``trainer.test`` right away); with ``cache_embeddings`` each evaluation split is embedded
    once and episodes look embeddings up instead of re-running the backbone.

    Metrics: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (mean over episodes),
    ``test/acc`` with ``test/acc_ci95`` (1.96 sigma / sqrt(n) over all ranks' episodes), and a
    printed ``xx.xx +- y.yy`` line.

    Args:
        backbone, weights, layer: the embedding network (see ``tl-lightning backbones``;
            ``conv4`` is the paper's encoder).
        num_classes: the evaluation way (the CLI links it from the datamodule); val/test
            episodes must have this many classes.
        class_names: names of the dataset's class ids (informational).
        distance: ``euclidean`` (squared, the paper) or ``cosine``.
        temperature: initial scale of cosine logits (learnable; unused for euclidean).
        projection_dim: add a linear projection to this many dims after the backbone.
        freeze_backbone: keep the backbone frozen and in eval mode.
        bn: what the backbone's BatchNorm layers do while it trains episodically, in the one
            vocabulary of :class:`~tl_lightning.backbones.BNPolicy`: ``train`` (batch
            statistics, running averages updated: the paper's Conv-4 from scratch), ``affine``
            (keep the pretrained running statistics; affine weights still train), ``stats``,
            ``eval`` or ``auto`` (``affine`` for pretrained weights, ``train`` for random init).
            Small, narrow episodes of a new domain give batch statistics that wreck pretrained
            features (EfficientNet-Lite0 on digits: 76 % -> 44 % 5-shot after 60 episodes with
            ``train``). Deprecated: ``eval`` meant ``affine`` here until this release; it still
            does, with a ``FutureWarning``.
        cache_embeddings: with a frozen backbone, embed val/test images once.
        embed_batch_size: images per forward while caching (64 ran 1.4x faster than 256 on a
            2-core CPU: the activations stay in cache; raise it on a GPU).
        optimizer, lr_scheduler: the paper uses Adam, lr 1e-3, halved every 2000 episodes.
        channels_last: run the backbone in channels-last memory format.

    Example:
        >>> model = ProtoNetModule(backbone="conv4", weights=None, num_classes=5)
        >>> support, query = torch.randn(5, 3, 28, 28), torch.randn(10, 3, 28, 28)
        >>> logits, target = model.episode_logits(support, torch.tensor([3, 1, 4, 0, 9]), query)
        >>> logits.shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        backbone: str = "conv4",
        weights: str | None = "DEFAULT",
        layer: str | None = None,
        num_classes: int = 5,
        class_names: list[str] | None = None,
        distance: str = "euclidean",
        temperature: float = 10.0,
        projection_dim: int | None = None,
        freeze_backbone: bool = False,
        bn: str = "auto",
        cache_embeddings: bool = True,
        embed_batch_size: int = 64,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = True,
    ):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance '{distance}'; valid: {list(DISTANCES)}")
        if num_classes < 2:
            raise ValueError(f"num_classes (the evaluation way) must be >= 2, got {num_classes}")
        policy = BNPolicy.parse(bn, "ProtoNetModule")  # its old `eval` warns, maps to `affine`
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be >= 1 or null, got {projection_dim}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.hparams.bn = policy.value  # checkpoints and printed configs carry the new spelling
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.class_names = class_names
        self.backbone: Backbone = build_backbone(backbone, weights=weights, layer=layer)
        dim = self.backbone.feature_dim
        self.projection = nn.Linear(dim, projection_dim) if projection_dim else nn.Identity()
        if distance == "cosine":
            self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        else:
            self.register_buffer("temperature", torch.tensor(1.0), persistent=False)
        self.bn = policy.resolve(self.backbone.pretrained)
        if freeze_backbone:
            self.backbone.freeze(bn="eval")
            self.backbone.eval()
        elif self.bn != BNPolicy.TRAIN:
            # Backbone re-applies it after every .train(); Lightning does not call .train() at
            # the start of fit, so it must hold from construction
            self.backbone.set_bn_policy(self.bn)
        self.val_loss, self.val_acc = MeanMetric(), MeanMetric()
        self.test_loss, self.test_accs = MeanMetric(), CatMetric()
        self.val_accs = CatMetric()  # per-episode val accuracies (TensorBoard histogram)
        self.val_episode_accuracies: torch.Tensor | None = None
        self.test_results: dict[str, float] | None = None
        self.test_episode_accuracies: torch.Tensor | None = None
        self._cache: dict[str, tuple[Dataset, torch.Tensor]] = {}
        # predict: the support's prototypes and the class name of each logit column
        self._predict: tuple[PrototypeClassifier, list[str]] | None = None

    # --- embedding -------------------------------------------------------------------------
    @property
    def uses_cached_embeddings(self) -> bool:
        """True when evaluation embeds each split once (frozen backbone and ``cache_embeddings``)."""
        return bool(self.hparams.freeze_backbone and self.hparams.cache_embeddings)

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B, D]`` (no autograd graph when the backbone is frozen)."""
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.hparams.freeze_backbone:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, E]`` of images ``[B, 3, H, W]``."""
        return self.projection(self.backbone_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def _embed_inputs(
        self, support: torch.Tensor, query: torch.Tensor, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(support)
        if support.ndim == 1:  # dataset indices: look the cached features up
            feats = self._cache[stage][1]
            both = self.projection(feats[torch.cat([support, query]).to(feats.device)])
        else:  # one forward for both, as in the paper's code (BN sees the whole episode)
            both = self.embed(torch.cat([support, query]))
        return both[:n], both[n:]

    def classifier(self) -> PrototypeClassifier:
        """A nearest-prototype classifier over this model's embedding and distance."""
        return PrototypeClassifier(
            self.embed, self.hparams.distance, self.temperature, self.hparams.embed_batch_size
        )

    def logits(self, query_emb: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Query logits against prototypes with this model's distance."""
        return prototype_logits(
            query_emb.float(), prototypes.float(), self.hparams.distance, self.temperature
        )

    def episode_logits(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor | None = None,
        stage: str = "predict",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits [Q, N], query targets in 0..N-1 or None)`` for one episode of any class ids."""
        _, _, q_labels = remap_labels(support_labels, query_labels)  # checks the query ids
        s_emb, q_emb = self._embed_inputs(support, query, stage)
        classifier = self.classifier()
        classifier.process_support_embeddings(s_emb, support_labels.to(s_emb.device))
        return classifier.logits(q_emb), q_labels

    def cached_episodes_logits(
        self,
        support: torch.Tensor,
        support_labels: torch.Tensor,
        query: torch.Tensor,
        query_labels: torch.Tensor,
        stage: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Many episodes in one step on cached embeddings: ``[E, S]``/``[E, Q]`` dataset indices
        and labels -> ``(logits [E, Q, N], targets [E, Q])``. The same numbers as
        :meth:`episode_logits` one episode at a time, without a Lightning step per episode."""
        feats = self._cache[stage][1]
        both = self.projection(feats[torch.cat([support, query], dim=1).to(feats.device)]).float()
        n_support = support.shape[1]
        remapped = [remap_labels(s, q) for s, q in zip(support_labels, query_labels, strict=True)]
        ways = {len(classes) for classes, _, _ in remapped}
        if len(ways) != 1:
            raise DataError(f"episodes of one batch have different numbers of classes: {sorted(ways)}")
        s_labels = torch.stack([s for _, s, _ in remapped]).to(both.device)
        targets = torch.stack([q for _, _, q in remapped]).to(both.device)
        prototypes = class_prototypes(both[:, :n_support], s_labels, ways.pop())
        return self.logits(both[:, n_support:], prototypes), targets

    # --- lifecycle -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        if self.uses_cached_embeddings and hasattr(datamodule, "use_frozen_features"):
            datamodule.use_frozen_features(stage)  # evaluation: embed each split once

    def train(self, mode: bool = True) -> ProtoNetModule:
        super().train(mode)
        if self.hparams.freeze_backbone:
            self.backbone.eval()  # frozen means frozen: BN statistics must not move
        return self

    def param_groups(self) -> list[dict]:
        """Trainable parameters as named groups: ``backbone`` and ``head`` (projection, temperature)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and not n.startswith("backbone.")
        ]
        groups = [{"name": "backbone", "params": backbone, "lr_scale": 1.0}] if backbone else []
        return groups + ([{"name": "head", "params": head, "lr_scale": 1.0}] if head else [])

    # --- cached embeddings -----------------------------------------------------------------
    @torch.no_grad()
    def embed_dataset(self, dataset: Dataset, desc: str = "embedding") -> torch.Tensor:
        """Backbone features of every ``(image, label)`` item of ``dataset``, in order ``[N, D]``."""
        loader = DataLoader(dataset, batch_size=self.hparams.embed_batch_size, shuffle=False)
        show = self._trainer is None or self.trainer.is_global_zero
        feats = [
            self.backbone_features(x.to(self.device)).float()
            for x, _ in tqdm(loader, desc=desc, disable=not show, leave=False)
        ]
        return torch.cat(feats)

    def _prepare_cache(self, stage: str, loaders: Any) -> None:
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        index_ds = getattr(loader, "dataset", None)
        images = getattr(index_ds, "dataset", None)
        if images is None or not hasattr(
            index_ds, "labels"
        ):  # not an IndexDataset: nothing to cache
            return
        if stage not in self._cache or self._cache[stage][0] is not images:
            was_training = self.backbone.training
            self.backbone.eval()
            self._cache[stage] = (
                images,
                self.embed_dataset(images, desc=f"caching {stage} embeddings"),
            )
            self.backbone.train(was_training)

    def on_validation_epoch_start(self) -> None:
        if self.uses_cached_embeddings:
            self._prepare_cache("val", self.trainer.val_dataloaders)

    def on_test_epoch_start(self) -> None:
        if self.uses_cached_embeddings:
            self._prepare_cache("test", self.trainer.test_dataloaders)

    # --- steps -----------------------------------------------------------------------------
    def _episode(self, batch: Any, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, accuracy)`` of one episode (scalars) or of a batch of cached episodes (``[E]``)."""
        support, support_labels, query, query_labels = batch
        if support.ndim == 2:  # [E, S] dataset indices: several cached episodes in one step
            logits, target = self.cached_episodes_logits(*batch, stage)
        else:
            logits, target = self.episode_logits(
                support, support_labels, query, query_labels, stage
            )
        way = logits.shape[-1]
        if stage in ("val", "test") and way != self.hparams.num_classes:
            raise DataError(
                f"{stage} episode has {way} classes but the model evaluates "
                f"{self.hparams.num_classes}-way (num_classes); make data.way equal model.num_classes"
            )
        losses = F.cross_entropy(logits.reshape(-1, way), target.reshape(-1), reduction="none")
        loss = losses.view(target.shape).mean(dim=-1)
        acc = (logits.argmax(dim=-1) == target).float().mean(dim=-1)
        return loss, acc

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss, acc = self._episode(batch, "train")
        self.log_train("train/loss", loss, batch_size=1, prog_bar=True)
        self.log_train("train/acc", acc, batch_size=1, on_step=False)
        return loss if loss.requires_grad else None  # nothing trainable: skip the backward

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._episode(batch, "val")
        self.val_loss.update(loss)
        self.val_acc.update(acc)
        self.val_accs.update(acc.reshape(-1))

    def on_validation_epoch_end(self) -> None:
        # logged once per epoch, not per episode: a log call costs more than an episode on
        # cached embeddings. Every compute() is a collective over DDP ranks: runs on every rank.
        if self.val_loss.update_called:
            self.log("val/loss", self.val_loss.compute())
            self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_episode_accuracies = self.val_accs.compute().reshape(-1).cpu()
        self.val_accs.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, acc = self._episode(batch, "test")
        self.test_loss.update(loss)
        self.test_accs.update(acc.reshape(-1))

    def on_test_epoch_end(self) -> None:
        accs = self.test_accs.compute().reshape(-1).cpu()  # gathered over all DDP ranks
        self.test_accs.reset()
        if self.test_loss.update_called:
            self.log("test/loss", self.test_loss.compute())  # once: see on_validation_epoch_end
        self.test_loss.reset()
        mean, ci = confidence_interval(accs)
        self.test_episode_accuracies = accs
        self.test_results = {"acc": mean, "acc_ci95": ci, "episodes": accs.numel()}
        self.log("test/acc", mean)
        self.log("test/acc_ci95", ci)
        rank_zero_info(
            f"test accuracy over {accs.numel()} episodes: {100 * mean:.2f} +- {100 * ci:.2f} %"
        )

    # --- predict: classify query images against a labelled support folder ------------------
    def on_predict_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "support_dataloader"):
            raise ValueError(
                "ProtoNet predict needs support examples: use "
                "--data tl_lightning.data.few_shot_predict.FewShotPredictDataModule "
                "--data.support_dir SUPPORT/ --data.query_dir QUERY/"
            )
        self.support_prototypes(datamodule.support_dataloader(), datamodule.class_names)

    @torch.no_grad()
    def support_prototypes(
        self, loader: DataLoader, names: list[str]
    ) -> tuple[torch.Tensor, list[str]]:
        """``(prototypes [N, E], class names)`` from a loader of ``(image, label)`` support batches."""
        classifier = self.classifier()
        self._predict = (classifier, support_classifier(classifier, loader, names, self.device))
        return classifier.prototypes, self._predict[1]

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``probs`` [B, N], ``pred`` [B], ``class_name`` list and ``id`` (file paths) per query batch."""
        if not batch:  # every image of the batch failed to load
            return {}
        if self._predict is None:
            raise RuntimeError(
                "no support prototypes: predict through Trainer.predict with a FewShotPredictDataModule"
            )
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        ids = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        classifier, names = self._predict
        probs = classifier(x).softmax(dim=1)
        pred = probs.argmax(dim=1)
        return {
            "probs": probs,
            "pred": pred,
            "class_name": [names[i] for i in pred.tolist()],
            "id": ids,
        }


@dataclass(frozen=True)
class FewShotPrediction:
    """One query image's predicted class and its probability (softmax over the support classes)."""

    path: str
    class_name: str
    probability: float


def predict_few_shot(
    model_or_backbone: ProtoNetModule | Backbone | str,
    support_dir: str | Path,
    query_dir: str | Path,
    image_size: int | None = None,
    batch_size: int = 64,
    distance: str | None = None,
) -> list[FewShotPrediction]:
    """Classify every image under ``query_dir`` by the nearest prototype of ``support_dir/<class>/``.

    ``model_or_backbone``: a trained (or frozen) :class:`ProtoNetModule`, a :class:`Backbone`,
    or a backbone name (built with its default pretrained weights). Preprocessing comes from the
    backbone; ``image_size`` overrides its input size. Unreadable query images are skipped (logged).

    Example:
        >>> preds = predict_few_shot("efficientnet_lite0", "support/", "queries/", image_size=64)
        >>> preds[0].class_name, round(preds[0].probability, 2)
        ('cat', 0.93)
    """
    from tl_lightning.data.few_shot_predict import FewShotPredictDataModule

    if isinstance(model_or_backbone, str):
        model_or_backbone = build_backbone(model_or_backbone)
    if isinstance(model_or_backbone, ProtoNetModule):
        net: nn.Module = model_or_backbone
        classifier = PrototypeClassifier(
            net.embed, distance or net.hparams.distance, net.temperature, batch_size
        )
    elif isinstance(model_or_backbone, Backbone):
        net = model_or_backbone
        classifier = PrototypeClassifier(net, distance or "euclidean", batch_size=batch_size)
    else:
        raise TypeError(
            f"model_or_backbone must be a ProtoNetModule, Backbone or backbone name, got {type(model_or_backbone).__name__}"
        )
    backbone = net.backbone if isinstance(net, ProtoNetModule) else net
    dm = FewShotPredictDataModule(support_dir, query_dir, backbone="conv4", batch_size=batch_size)
    dm.use_data_config(backbone.data_config, image_size)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            names = support_classifier(classifier, dm.support_dataloader(), dm.class_names, device)
            out = []
            for batch in tqdm(dm.predict_dataloader(), desc="few-shot predict", leave=False):
                if not batch:
                    continue
                x, paths = batch
                best, pred = classifier(x.to(device)).softmax(dim=1).max(dim=1)
                out += [
                    FewShotPrediction(str(p), names[i], float(b))
                    for p, i, b in zip(paths, pred.tolist(), best.tolist(), strict=True)
                ]
    finally:
        net.train(was_training)
    return out


def support_classifier(
    classifier: PrototypeClassifier, loader: DataLoader, names: list[str], device: torch.device
) -> list[str]:
    """``process_support_set`` on every ``(image, label)`` batch of ``loader``; returns the class
    name of each logit column (``names`` is indexed by the support's class ids)."""
    batches = [batch for batch in loader if batch]  # [] when every image of a batch failed
    images = torch.cat([x for x, _ in batches]).to(device)
    classifier.process_support_set(images, torch.cat([y for _, y in batches]).to(device))
    return [names[i] for i in classifier.classes.tolist()]
