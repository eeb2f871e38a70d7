"""Feature extraction: a frozen pretrained backbone ("ConvNet as fixed feature extractor") + a new head."""

from __future__ import annotations

import hashlib
import warnings

import torch
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.feature_cache import (
    FeatureDataset,
    cache_key,
    cached_features,
    dataset_fingerprint,
)
from tl_lightning.modules.base import ClassifierModule

# Lightning warns when modules are in eval mode at fit start; here that is the point.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")



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
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
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
        transform = getattr(dataset, "transform", None)
        key = cache_key(
            backbone=self.hparams.backbone,
            layer=self.hparams.layer,
            weights=self._weights_fingerprint(),
            data=dataset_fingerprint(dataset, repr(transform)),
            dtype=self.hparams.cache_dtype,
            precision=str(self.trainer.precision),  # bf16 features differ from fp32 ones
        )
        trainer = self.trainer
        datamodule = trainer.datamodule
        data_batch = getattr(datamodule, "batch_size", None) or getattr(
            datamodule, "hparams", {}
        ).get("batch_size")
        args = dict(
            key=key,
            cache_dir=self.hparams.cache_dir,
            dtype=self.hparams.cache_dtype,
            batch_size=self.hparams.cache_batch_size or data_batch or 128,
            device=trainer.strategy.root_device,
            forward_context=trainer.precision_plugin.forward_context,
            desc=f"caching {split} features",
        )
        self.backbone.to(trainer.strategy.root_device)
        if trainer.is_global_zero:
            cached_features(self.backbone, dataset, **args)
        trainer.strategy.barrier("feature_cache")
        return cached_features(self.backbone, dataset, **args)  # a cache hit on every rank

    def _weights_fingerprint(self) -> str:
        h = hashlib.sha256()
        for name, tensor in self.backbone.state_dict().items():
            h.update(name.encode())
            h.update(
                tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
        return h.hexdigest()
