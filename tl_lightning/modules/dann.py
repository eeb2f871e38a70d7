"""DANN: domain-adversarial training (Ganin & Lempitsky 2015; Ganin et al. 2016, JMLR 17(59))."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers the paper's digits CNN, `dann_cnn`)
from tl_lightning.backbones.backbone import BNPolicy
from tl_lightning.modules.base import ClassifierModule
from tl_lightning.modules.grl import GradientReversal, grl_lambda
from tl_lightning.optim import make_optimizer, make_scheduler


def dann_lr_factor(progress: float, alpha: float = 10.0, beta: float = 0.75) -> float:
    """The paper's LR annealing ``1 / (1 + alpha p)^beta`` (multiplies ``lr0``)."""
    p = min(max(float(progress), 0.0), 1.0)
    return 1.0 / (1.0 + alpha * p) ** beta


class DANNAnnealing(LambdaLR):
    """Per-step ``lr_p = lr0 / (1 + alpha p)^beta`` with ``p = step / total_steps``, every group."""

    def __init__(
        self, optimizer: Optimizer, total_steps: int, alpha: float = 10.0, beta: float = 0.75
    ):
        total = max(1, int(total_steps))
        super().__init__(optimizer, lambda step: dann_lr_factor(step / total, alpha, beta))


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """``Linear -> ReLU (-> Dropout)`` per hidden width, then ``Linear(out_dim)``."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


class DANNModule(ClassifierModule):
    """Domain-adversarial neural network: a label head on source, a domain head through a GRL.

    Each training batch is ``{"source": (x, y), "target": x}`` (from
    :class:`~tl_lightning.data.domain.DomainAdaptationDataModule`): half source, half target. The
    label loss uses source labels only; the domain head (``BCEWithLogits``, autocast-safe)
    classifies source (0) vs target (1) features through a gradient reversal layer, so the
    feature extractor learns features the domain head cannot separate. Paper defaults:

    - GRL scale ``lambda_p = 2 / (1 + exp(-gamma p)) - 1``, ``gamma = 10``,
      ``p = global_step / trainer.estimated_stepping_batches``;
    - SGD, momentum 0.9, per-step ``lr_p = lr / (1 + lr_alpha p)^lr_beta`` (0.01, 10, 0.75), the
      backbone at ``backbone_lr_scale`` (0.1: for pretrained backbones; use 1.0 from scratch).

    Args:
        bottleneck_dim: optional ``Linear -> BatchNorm1d -> ReLU`` between backbone and both heads
            (the paper's deep-network setup uses 256).
        head_hidden_dims: hidden widths of the label head (the paper's digits net: ``[100, 100]``);
            ``None`` uses the base ``head`` kind (``linear``/``mlp``).
        domain_hidden_dims, domain_dropout: the domain head (paper: 1024-1024, dropout 0.5, for deep
            features; ``[100]`` for the digits net).
        freeze_groups: backbone layer groups to keep frozen, e.g. ``[stem]``.
        bn: BatchNorm policy of the frozen groups, the vocabulary of
            :class:`~tl_lightning.backbones.backbone.BNPolicy` (``eval``: statistics and affine
            fixed, the default; ``stats``, ``affine``, ``train``, ``auto``).
        gamma: GRL schedule steepness. domain_loss_weight: multiplies the domain loss.
        source_only: the baseline with identical code: no domain gradient reaches the features
            (the domain head still trains on detached features, so ``train/domain_acc`` shows
            how separable the domains are without adaptation).
        lr, momentum, weight_decay: the default SGD; ``optimizer`` replaces it (its own ``lr``
            is then the base LR). lr_alpha, lr_beta: annealing (``lr_alpha: 0`` = constant LR);
            a given ``lr_scheduler`` replaces the annealing.
        **kwargs: :class:`ClassifierModule` args (``layer``, ``head``, ``label_smoothing``, ...).

    Logs ``train/class_loss``, ``train/domain_loss``, ``train/domain_acc`` (near 0.5 = aligned
    features), ``train/grl_lambda``, ``train/lr``; ``val/acc`` (= source val accuracy, what
    checkpoints monitor), ``val/source_acc``, ``val/target_acc`` (diagnostic only),
    ``val/acc_gap`` (source - target); ``test/acc`` on the target test split.

    Example:
        >>> model = DANNModule(num_classes=10, backbone="dann_cnn", weights=None,
        ...                    head_hidden_dims=[100, 100], domain_hidden_dims=[100],
        ...                    backbone_lr_scale=1.0)
        >>> [g["name"] for g in model.param_groups()]
        ['head', 'domain_head', 'backbone']
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnet_lite0",
        weights: str | None = "DEFAULT",
        class_names: list[str] | None = None,
        bottleneck_dim: int | None = None,
        head_hidden_dims: list[int] | None = None,
        domain_hidden_dims: list[int] | None = None,
        domain_dropout: float = 0.5,
        freeze_groups: list[str] | None = None,
        bn: str = "eval",
        gamma: float = 10.0,
        domain_loss_weight: float = 1.0,
        source_only: bool = False,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_alpha: float = 10.0,
        lr_beta: float = 0.75,
        backbone_lr_scale: float = 0.1,
        optimizer: OptimizerCallable | None = None,
        **kwargs: Any,
    ):
        BNPolicy.parse(bn)  # a clear error before anything is built
        if optimizer is None:
            optimizer = functools.partial(
                torch.optim.SGD, lr=lr, momentum=momentum, weight_decay=weight_decay
            )
        super().__init__(
            num_classes, backbone, weights, class_names=class_names, optimizer=optimizer, **kwargs
        )
        if domain_hidden_dims is None:
            domain_hidden_dims = [1024, 1024]
            self.hparams.domain_hidden_dims = domain_hidden_dims
        for name, value in (
            ("gamma", gamma),
            ("domain_loss_weight", domain_loss_weight),
            ("lr", lr),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if bottleneck_dim is not None and bottleneck_dim < 1:
            raise ValueError(
                f"bottleneck_dim must be a positive width or null, got {bottleneck_dim}"
            )
        if freeze_groups:
            self.backbone.freeze(freeze_groups, bn=bn)
        feat_dim = self.backbone.feature_dim
        self.bottleneck: nn.Module = nn.Identity()
        if bottleneck_dim:
            self.bottleneck = nn.Sequential(
                nn.Linear(feat_dim, bottleneck_dim),
                nn.BatchNorm1d(bottleneck_dim),
                nn.ReLU(inplace=True),
            )
            feat_dim = bottleneck_dim
        # the base head was sized for the backbone's features: rebuild it for the new input
        if head_hidden_dims is not None or bottleneck_dim:
            if head_hidden_dims is not None:
                self.head = mlp(
                    feat_dim, head_hidden_dims, num_classes, self.hparams.head_hidden_dropout
                )
            else:
                from tl_lightning.heads import build_head

                hp = self.hparams
                self.head = build_head(
                    hp.head,
                    feat_dim,
                    num_classes,
                    hp.head_hidden_dim,
                    hp.head_dropout,
                    hp.head_hidden_dropout,
                )
        self.domain_head = mlp(feat_dim, domain_hidden_dims, 1, domain_dropout)
        self.grl = GradientReversal(0.0)
        self.val_target_acc = MulticlassAccuracy(num_classes, average="micro")
        self._total_steps: int | None = None

    # --- network -------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features through the optional bottleneck: what both heads see."""
        return self.bottleneck(super().features(x))

    def param_groups(self) -> list[dict]:
        """``head`` (bottleneck + label head) and ``domain_head`` at the base LR, ``backbone`` scaled."""
        head = [p for m in (self.bottleneck, self.head) for p in m.parameters()]
        groups = [
            {"name": "head", "params": head, "lr_scale": 1.0},
            {"name": "domain_head", "params": list(self.domain_head.parameters()), "lr_scale": 1.0},
        ]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        if backbone:  # a fully frozen backbone stays out of the optimizer
            groups.append(
                {"name": "backbone", "params": backbone, "lr_scale": self.hparams.backbone_lr_scale}
            )
        return groups

    # --- schedules -----------------------------------------------------------------------------
    def total_steps(self) -> int:
        if self._total_steps is None:
            self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        return self._total_steps

    def progress(self) -> float:
        """Training progress ``p = global_step / estimated_stepping_batches`` in [0, 1]."""
        if self._trainer is None:
            return 0.0
        return min(1.0, self.global_step / self.total_steps())

    def current_grl_lambda(self) -> float:
        return 0.0 if self.hparams.source_only else grl_lambda(self.progress(), self.hparams.gamma)

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.optimizer_factory, self.param_groups())
        if self.scheduler_factory is not None:
            scheduler = make_scheduler(self.scheduler_factory, optimizer, self.total_steps())
        else:
            hp = self.hparams
            scheduler = {
                "scheduler": DANNAnnealing(optimizer, self.total_steps(), hp.lr_alpha, hp.lr_beta),
                "interval": "step",
            }
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_fit_start(self) -> None:
        self._total_steps = None  # a new fit may have a different length

    # --- steps ---------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not isinstance(batch, dict) or not {"source", "target"} <= set(batch):
            raise ValueError(
                "DANNModule trains on {'source': (x, y), 'target': x} batches; "
                "use tl_lightning.data.domain.DomainAdaptationDataModule as the datamodule"
            )
        xs, ys = batch["source"][0], batch["source"][1]
        target = batch["target"]
        # a target label, if a loader passes one, is dropped here and never used
        xt = target[0] if isinstance(target, (list, tuple)) else target
        if xs.shape[1:] != xt.shape[1:]:
            raise ValueError(
                f"source images {tuple(xs.shape[1:])} and target images {tuple(xt.shape[1:])} differ; "
                "give both datamodules the same image_size"
            )
        lam = self.current_grl_lambda()
        self.grl.set_lambda(lam)
        feats = self.features(torch.cat([xs, xt]))  # one pass: BatchNorm sees both domains
        logits = self.head(feats[: len(xs)])
        class_loss = self.loss(logits, ys)

        # source_only: the domain head still learns, but on detached features (no adaptation)
        domain_in = feats.detach() if self.hparams.source_only else self.grl(feats)
        domain_logits = self.domain_head(domain_in).squeeze(1).float()
        domain_target = torch.cat([feats.new_zeros(len(xs)), feats.new_ones(len(xt))]).float()
        domain_loss = F.binary_cross_entropy_with_logits(domain_logits, domain_target)
        weight = 1.0 if self.hparams.source_only else self.hparams.domain_loss_weight
        loss = class_loss + weight * domain_loss

        n = len(xs)
        hard = ys.argmax(dim=1) if ys.is_floating_point() else ys
        self.train_metrics.update(logits.detach(), hard)
        domain_acc = ((domain_logits.detach() > 0).float() == domain_target).float().mean()
        self.log_train("train/loss", loss, batch_size=n, prog_bar=True)
        self.log_train("train/class_loss", class_loss, batch_size=n)
        self.log_train("train/domain_loss", domain_loss, batch_size=2 * n)
        self.log_train("train/domain_acc", domain_acc, batch_size=2 * n, prog_bar=True)
        self.log("train/grl_lambda", lam, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/lr", self._head_lr(), on_step=True, on_epoch=False, batch_size=n)
        return loss

    def _head_lr(self) -> float:
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if not optimizers:
            return float(self.hparams.lr)
        groups = optimizers[0].param_groups
        return float(next((g["lr"] for g in groups if g.get("name") == "head"), groups[0]["lr"]))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Loader 0 is source val (model selection), loader 1 target val (a diagnostic only)."""
        x, y = batch[0], batch[1]
        logits = self(x)
        if dataloader_idx == 0:
            self.val_metrics.update(logits, y)
            self.val_confusion.update(logits, y)
            loss = self.loss(logits, y)
            self.log(
                "val/loss",
                loss,
                prog_bar=True,
                sync_dist=True,
                batch_size=len(x),
                add_dataloader_idx=False,
            )
        else:
            self.val_target_acc.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        source = self.val_metrics.compute()  # synced across processes by torchmetrics
        self.val_metrics.reset()
        self.log_dict(source, prog_bar=True)  # already global: no second reduction
        self.log("val/source_acc", source["val/acc"])
        if self.val_target_acc.update_called:
            target = self.val_target_acc.compute()
            self.val_target_acc.reset()
            self.log("val/target_acc", target, prog_bar=True)
            self.log("val/acc_gap", source["val/acc"] - target)
        super().on_validation_epoch_end()
