"""Feature extraction: a frozen pretrained backbone ("ConvNet as fixed feature extractor") + a new head."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.callbacks.visual_utils import tensorboard_writer
from tl_lightning.feature_cache import (
    FeatureDataset,
    cache_key,
    cached_features,
    dataset_fingerprint,
)
from tl_lightning.modules.base import ClassifierModule
from tl_lightning.probe import ProbeResult, sweep_logistic_regression

# Lightning warns when modules are in eval mode at fit start; here that is the point.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

PROBES = ("sgd", "lbfgs")


class FeatureExtractionModule(ClassifierModule):
    """Train only a new head on a frozen backbone that stays in eval mode for the whole run.

    The backbone is frozen with the ``eval`` BatchNorm policy and kept in eval mode even when
    Lightning calls ``model.train()``, so its BN statistics never move (the seeds' loop called
    ``model.train()`` on the frozen network and lost 17 accuracy points on digits). It runs
    under ``no_grad``: no activations are kept for a backward pass that would not use them.

    With ``cache_features`` (default) and a deterministic train pipeline (``augment: none``, no
    MixUp/CutMix), each split's features are computed once into an on-disk memory-mapped cache
    keyed by backbone weights, layer, preprocessing and data; epochs then train the head on them.
    With augmentation on, images go through the backbone every step as usual. Under DDP rank 0
    fills the cache while the other ranks wait, then every rank reads it.

    Args:
        cache_features: cache frozen features when the train pipeline is deterministic.
        cache_dir: where caches live (default ``$TL_LIGHTNING_CACHE`` or ``~/.cache/tl_lightning/features``).
        cache_dtype: ``float32`` or ``float16`` (half the disk and page cache, ~1e-3 relative error).
        cache_batch_size: images per forward pass while caching; default the datamodule's
            ``batch_size``, the batch the uncached loop would use (128 if it has none). On a CPU,
            batches larger than its caches hold are slower per image: 128 took 1.11-1.24x longer
            than 64 here.
        probe: ``sgd`` (default) trains the head with the configured optimizer for the trainer's
            epochs. ``lbfgs`` fits it the way Kornblith et al. (2019) and CLIP evaluate linear
            probes: L2-regularised logistic regression by full-batch L-BFGS on the cached
            features, one fit per strength in ``probe_grid``, the best on validation data kept
            (:mod:`tl_lightning.probe`). The fit runs at the start of the first epoch, that
            epoch validates and checkpoints the chosen head as usual, and training stops there.
            Needs cached features (``augment: none``), a ``linear`` head, a validation split, and
            no label smoothing or class weights (the objective has neither).
        probe_grid: ``lbfgs`` strengths ``l2`` (``C = 1 / (n_train * l2)`` in scikit-learn terms);
            default ``tl_lightning.probe.DEFAULT_GRID``, 1e-6 .. 1, two a decade.
        probe_max_iter: ``lbfgs`` iterations per strength at most.
        probe_tol: ``lbfgs`` stops when every gradient entry is below this (scikit-learn's ``tol``
            and default). 1e-8 reaches the minimiser itself, so the chosen ``l2`` is the one any
            exact solver picks; 1e-4 stops earlier where the problem is badly conditioned (weak
            ``l2``, more feature dimensions than images) and may pick a neighbouring strength.
        Everything else: see :class:`~tl_lightning.modules.base.ClassifierModule`.

    Example:
        >>> model = FeatureExtractionModule(num_classes=10, backbone="efficientnet_lite0")
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *args,
        cache_features: bool = True,
        cache_dir: str | None = None,
        cache_dtype: str = "float32",
        cache_batch_size: int | None = None,
        probe: str = "sgd",
        probe_grid: list[float] | None = None,
        probe_max_iter: int = 1000,
        probe_tol: float = 1e-4,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if probe not in PROBES:
            raise ValueError(f"probe must be one of {list(PROBES)}, got '{probe}'")
        if probe == "lbfgs":
            self._check_lbfgs_options()
            self.automatic_optimization = False  # the head is solved, not stepped
        self.probe_result: ProbeResult | None = None
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"cache_dtype must be 'float32' or 'float16', got '{cache_dtype}'")
        if cache_batch_size is not None and cache_batch_size < 1:
            raise ValueError(f"cache_batch_size must be a positive integer, got {cache_batch_size}")
        self.backbone.freeze(bn="eval")
        self.backbone.eval()

    def train(self, mode: bool = True) -> FeatureExtractionModule:
        super().train(mode)
        self.backbone.eval()  # frozen means frozen: BN statistics must not move
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # already features (from the cache)
            return x.float()
        with torch.no_grad():
            return super().features(x)

    def param_groups(self) -> list[dict]:
        return [{"name": "head", "params": list(self.head.parameters()), "lr_scale": 1.0}]

    def configure_optimizers(self) -> Any:
        if self.hparams.probe == "lbfgs":
            # L-BFGS solves the head in on_train_start; this lr-0 optimizer only records that solve
            # as the run's one optimizer step (checkpoints are not written at global step 0)
            return torch.optim.SGD(
                [{"name": "head", "params": list(self.head.parameters())}], lr=0.0
            )
        return super().configure_optimizers()

    # --- the L-BFGS probe ----------------------------------------------------------------------
    def _check_lbfgs_options(self) -> None:
        hp = self.hparams
        problems = []
        if hp.head != "linear":
            problems.append(f"head: '{hp.head}' (use head: linear)")
        if hp.label_smoothing:
            problems.append(f"label_smoothing: {hp.label_smoothing} (use 0)")
        if hp.class_weights is not None:
            problems.append(f"class_weights: {hp.class_weights} (use null)")
        if not hp.cache_features:
            problems.append("cache_features: false (use true)")
        if hp.probe_grid is not None and (not hp.probe_grid or min(hp.probe_grid) <= 0):
            problems.append(f"probe_grid: {hp.probe_grid} (non-empty, every l2 > 0)")
        if problems:
            raise ValueError(
                "probe: lbfgs fits a plain linear logistic regression; " + "; ".join(problems)
            )

    def _split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = getattr(self.trainer.datamodule, split, None) if self.trainer.datamodule else None
        if not isinstance(dataset, FeatureDataset):
            raise ValueError(
                f"probe: lbfgs needs the cached features of the datamodule's {split}, which has "
                f"{'none' if dataset is None else 'images'}; set augment: none (no MixUp/CutMix) "
                "so the train pipeline is deterministic and features are cached"
            )
        device = self.head[-1].weight.device
        features = torch.from_numpy(np.array(dataset.features, dtype=np.float32)).to(device)
        return features, torch.from_numpy(np.array(dataset.labels)).to(device)

    def on_train_start(self) -> None:
        super().on_train_start()  # the train loader's resume position (tl_lightning/resume.py)
        if self.hparams.probe != "lbfgs":
            return
        train_x, train_y = self._split_tensors("train_set")
        val_x, val_y = self._split_tensors("val_set")
        result = sweep_logistic_regression(
            train_x,
            train_y,
            val_x,
            val_y,
            self.hparams.num_classes,
            grid=self.hparams.probe_grid,
            max_iter=self.hparams.probe_max_iter,
            tol=self.hparams.probe_tol,
        )
        linear = self.head[-1]
        with torch.no_grad():
            linear.weight.copy_(result.weight)
            linear.bias.copy_(result.bias)
        self.probe_result = result
        rank_zero_info(
            f"L-BFGS probe: l2={result.l2:.3g} (C={1 / (len(train_y) * result.l2):.3g}) "
            f"val/acc={result.val_acc:.4f} over {len(result.curve)} strengths"
        )
        self._log_sweep(result, len(train_y))

    def _log_sweep(self, result: ProbeResult, n_train: int) -> None:
        """``probe/val_acc`` per fit (step k = k-th strength, strongest first) and, in TensorBoard,
        a figure of validation accuracy against ``l2`` on a log axis."""
        for step, (l2, acc) in enumerate(result.curve):
            for logger in self.loggers:
                logger.log_metrics({"probe/val_acc": acc, "probe/l2": l2}, step=step)
        writer = tensorboard_writer(self.trainer)
        if writer is None:
            return
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5), dpi=80)
        ax = fig.add_subplot()
        l2s, accs = zip(*sorted(result.curve))
        ax.plot(l2s, accs, "o-")
        ax.axvline(result.l2, color="grey", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel(f"l2 strength (scikit-learn C = 1 / ({n_train} l2))")
        ax.set_ylabel("val/acc")
        ax.set_title(f"L-BFGS probe: l2 = {result.l2:.3g}, val/acc = {result.val_acc:.4f}")
        fig.subplots_adjust(left=0.16, bottom=0.16, right=0.96, top=0.9)
        writer.add_figure("probe/val_acc_vs_l2", fig, global_step=0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.hparams.probe == "lbfgs":
            if batch_idx == 0:
                self.optimizers().step()  # no gradients: a no-op that counts the solve as step 1
                # stop now: Lightning validates (and checkpoints) after this batch and ends the
                # epoch, instead of reading every other batch (each sample through the seeded
                # loader, ~4 ms apiece on a CPU) for steps that would change nothing
                self.trainer.should_stop = True
            return None  # solved in on_train_start; this epoch only validates and checkpoints
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self.hparams.probe == "lbfgs":
            self.trainer.should_stop = True  # one solve is the whole fit

    # --- feature caching -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.hparams.cache_features or not hasattr(datamodule, "use_frozen_features"):
            return
        # the datamodule owns its datasets: it swaps in the cached features itself
        if not datamodule.use_frozen_features(stage, self._cache):
            rank_zero_info(
                "feature caching off: the train pipeline is random (augment/MixUp/CutMix)"
            )

    def _cache(self, dataset, split: str) -> FeatureDataset:
        return cache_split(
            self,
            dataset,
            split,
            cache_dir=self.hparams.cache_dir,
            dtype=self.hparams.cache_dtype,
            batch_size=self.hparams.cache_batch_size,
        )


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names and bytes): part of a feature cache's key."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_split(
    module: ClassifierModule,
    dataset,
    split: str,
    cache_dir: str | None = None,
    dtype: str = "float32",
    batch_size: int | None = None,
) -> FeatureDataset:
    """The cached features of ``module.backbone`` (in eval mode) on ``dataset``, computed if absent.

    Keyed by backbone, layer, weights, data, dtype and the trainer's precision; under DDP rank 0
    fills the cache while the other ranks wait, then every rank reads it. Used by
    :class:`FeatureExtractionModule` and by the frozen phase of
    :class:`~tl_lightning.callbacks.unfreezing.GradualUnfreezing`, so they share caches.
    """
    trainer = module.trainer
    transform = getattr(dataset, "transform", None)
    key = cache_key(
        backbone=module.hparams.backbone,
        layer=module.hparams.layer,
        weights=weights_fingerprint(module.backbone),
        data=dataset_fingerprint(dataset, repr(transform)),
        dtype=dtype,
        precision=str(trainer.precision),  # bf16 features differ from fp32 ones
    )
    datamodule = trainer.datamodule
    data_batch = getattr(datamodule, "batch_size", None) or getattr(datamodule, "hparams", {}).get(
        "batch_size"
    )
    args = dict(
        key=key,
        cache_dir=cache_dir,
        dtype=dtype,
        batch_size=batch_size or data_batch or 128,
        device=trainer.strategy.root_device,
        forward_context=trainer.precision_plugin.forward_context,
        desc=f"caching {split.removesuffix('_set')} features",
    )
    module.backbone.to(trainer.strategy.root_device)
    if trainer.is_global_zero:
        cached_features(module.backbone, dataset, **args)
    trainer.strategy.barrier("feature_cache")
    return cached_features(module.backbone, dataset, **args)  # a cache hit on every rank
