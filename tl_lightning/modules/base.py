"""What every tl-lightning classifier shares: backbone + head, loss, metrics, optimizers, predict."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from tl_lightning.backbones import Backbone, build_backbone, skip_pretrained_weights
from tl_lightning.config_checks import check_model_and_data
from tl_lightning.heads import build_head
from tl_lightning.optim import make_optimizer, make_scheduler
from tl_lightning.resume import restore_train_loader_state


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro F1 and (with more than 5 classes) top-5 accuracy, named ``prefix/...``."""
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=f"{prefix}/")


def balanced_class_weights(counts: Sequence[int]) -> torch.Tensor:
    """sklearn's ``balanced``: ``n_samples / (n_classes * count)``; absent classes get weight 0."""
    counts_t = torch.as_tensor(counts, dtype=torch.float)
    weights = counts_t.sum() / (len(counts_t) * counts_t.clamp(min=1))
    return torch.where(counts_t > 0, weights, torch.zeros_like(weights))


# Every epoch value the modules log is already the same on every rank (torchmetrics and log_train
# reduce over ranks; the unfreezing LRs are equal), so Lightning's advice to add sync_dist=True (a
# second, lazily timed all_reduce) does not apply.
warnings.filterwarnings(
    "ignore",
    message=r"It is recommended to use `self.log\('(train|val|test|unfreezing)/.*sync_dist=True",
)


class TransferModule(LightningModule):
    """What every tl-lightning module shares: optimizers over named param groups, safe reloading.

    Subclasses set ``optimizer_factory``/``scheduler_factory`` and implement :meth:`param_groups`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_means: dict[str, tuple[MeanMetric, bool]] = {}  # see log_train

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def log_train(
        self, name: str, value: torch.Tensor, batch_size: int, prog_bar: bool = False, on_step: bool = True
    ) -> None:
        """Log a training value per step as ``name`` and its epoch mean over all ranks.

        The epoch mean is logged as ``<name>_epoch`` (or as ``name`` when ``on_step=False``) from
        ``on_train_epoch_end``. Not Lightning's ``on_epoch=True, sync_dist=True``: that all_reduce
        runs lazily in whichever hook first reads the metrics, which on rank 0 is the progress bar's
        ``on_train_epoch_end`` while the other ranks (bar off) are already in the metrics' all_gather
        of the module's own hook: mismatched collectives, a DDP hang. A MeanMetric computed here runs
        its collective at the same point, in the same order, on every rank.
        """
        if on_step:
            self.log(name, value, prog_bar=prog_bar, on_step=True, on_epoch=False, batch_size=batch_size)
        if name not in self._train_means:  # a plain dict, not submodules: nothing to checkpoint
            self._train_means[name] = (MeanMetric().to(self.device), on_step)
        self._train_means[name][0].update(value.detach().float(), weight=batch_size)

    def on_train_epoch_end(self) -> None:
        for name, (mean, on_step) in self._train_means.items():
            if mean.update_called:
                self.log(f"{name}_epoch" if on_step else name, mean.compute())
            mean.reset()

    def on_train_start(self) -> None:
        # the loader may have been built before the checkpoint restore (schedulers read
        # estimated_stepping_batches), or saved at an epoch's end: put it where the resumed
        # run's first batch is (see tl_lightning/resume.py)
        restore_train_loader_state(self.trainer)

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            rank_zero_info(f"{type(self).__name__}: nothing to train; evaluate with `test`")
            return None
        optimizer = make_optimizer(self.optimizer_factory, groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = make_scheduler(
            self.scheduler_factory, optimizer, self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, **kwargs: Any):
        """Rebuild from a checkpoint alone: no weight download, and no code execution from the file."""
        kwargs.setdefault("weights_only", True)
        with skip_pretrained_weights():
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, **kwargs
            )


class ClassifierModule(TransferModule):
    """Backbone -> head classifier with the loss, metrics, optimizer and predict logic all modules share.

    Subclasses decide what trains (:meth:`param_groups`) and how the backbone runs.
    Metric names: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/f1_macro``,
    ``val/top5`` (> 5 classes), ``test/...`` and per-class ``test/recall/<class>`` (precision, f1 too).
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnet_lite0",
        weights: str | None = "DEFAULT",
        layer: str | None = None,
        head: str = "linear",
        head_hidden_dim: int = 512,
        head_dropout: float = 0.0,
        head_hidden_dropout: float = 0.0,
        class_names: list[str] | None = None,
        label_smoothing: float = 0.0,
        class_weights: str | list[float] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = True,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} names but num_classes is {num_classes}"
            )
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(
                f"class_weights must be null, 'balanced' or a list of floats, got '{class_weights}'"
            )
        if isinstance(class_weights, list) and len(class_weights) != num_classes:
            raise ValueError(
                f"class_weights has {len(class_weights)} values but num_classes is {num_classes}"
            )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.backbone: Backbone = build_backbone(backbone, weights=weights, layer=layer)
        self.head = build_head(
            head,
            self.backbone.feature_dim,
            num_classes,
            head_hidden_dim,
            head_dropout,
            head_hidden_dropout,
        )
        weight = (
            torch.tensor(class_weights, dtype=torch.float)
            if isinstance(class_weights, list)
            else torch.ones(num_classes)
        )
        self.register_buffer("class_weight", weight)
        self.train_metrics = classification_metrics(num_classes, "train")
        self.val_metrics = classification_metrics(num_classes, "val")
        self.test_metrics = classification_metrics(num_classes, "test")
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.last_confusion_matrix: torch.Tensor | None = None  # for the visual callbacks

    # --- network -------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``[B, D]``; a 2-D ``x`` already is (a feature cache's batch)."""
        if x.ndim == 2:
            return x
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, 3, H, W]``."""
        return self.head(self.features(x))

    def param_groups(self) -> list[dict]:
        """Named optimizer groups; the default trains everything at the base LR."""
        return [
            {
                "name": "all",
                "params": [p for p in self.parameters() if p.requires_grad],
                "lr_scale": 1.0,
            }
        ]

    # --- lifecycle -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # before any work on the data (feature caching included): num_classes, names, image size
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "check_model"):
            datamodule.check_model(stage)  # remembered: its loaders do not check again
        else:
            check_model_and_data(self, datamodule, stage)
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.hparams.class_weights == "balanced" and stage == "fit":
            counts = getattr(self.trainer.datamodule, "class_counts", None)
            if counts is None:
                raise ValueError(
                    "class_weights: balanced needs a datamodule exposing class_counts()"
                )
            self.class_weight.copy_(balanced_class_weights(counts()))

    # --- steps ---------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with label smoothing and class weights; ``target`` may be soft (MixUp)."""
        use_weights = self.hparams.class_weights is not None
        return F.cross_entropy(
            logits.float(),
            target,
            weight=self.class_weight if use_weights else None,
            label_smoothing=self.hparams.label_smoothing,
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss(logits, y)
        hard = y.argmax(dim=1) if y.is_floating_point() else y
        self.train_metrics.update(logits.detach(), hard)
        self.log_train("train/loss", loss, batch_size=len(x), prog_bar=True)
        return loss

    def log_epoch_metrics(self, metrics: MetricCollection, prog_bar: bool = False) -> None:
        """Log a metric collection once, at epoch end (torchmetrics syncs it over ranks), then reset.

        Logging the Metric objects from every step instead costs Lightning one log call per metric
        per step: about a third of a cached linear-probe fit (benchmarks/feature_extraction.py).
        """
        if not any(m.update_called for m in metrics.values()):
            return  # nothing seen this epoch (or a subclass logged and reset them already)
        values = metrics.compute()
        metrics.reset()
        self.log_dict(values, prog_bar=prog_bar)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log_epoch_metrics(self.train_metrics)

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        confusion = self.val_confusion if stage == "val" else self.test_confusion
        metrics.update(logits, y)
        confusion.update(logits, y)
        self.log(
            f"{stage}/loss",
            self.loss(logits, y),
            prog_bar=stage == "val",
            sync_dist=True,
            batch_size=len(x),
        )

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics(self.val_metrics, prog_bar=True)
        self.last_confusion_matrix = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics(self.test_metrics)
        cm = self.test_confusion.compute().float().cpu()
        self.test_confusion.reset()
        self.last_confusion_matrix = cm
        tp = cm.diag()
        recall = tp / cm.sum(1).clamp(min=1)
        precision = tp / cm.sum(0).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        for i, name in enumerate(self.class_names):
            self.log(f"test/recall/{name}", recall[i])
            self.log(f"test/precision/{name}", precision[i])
            self.log(f"test/f1/{name}", f1[i])

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``probs`` [B, C], ``pred`` [B], ``class_name`` list, and the batch's ``id`` (e.g. file paths)."""
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        probs = self(x).float().softmax(dim=1)
        pred = probs.argmax(dim=1)
        ids = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        return {
            "probs": probs,
            "pred": pred,
            "class_name": [self.class_names[i] for i in pred.tolist()],
            "id": ids,
        }
