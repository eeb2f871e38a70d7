"""LP-FT's first stage: fit a fine-tuning module's linear head with the cached linear probe.

Kumar et al. 2022 ("Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"): a randomly initialised head sends large, noisy gradients into the
pretrained features early in fine-tuning; starting from a linear probe's head avoids that. The
features of the starting backbone are cached once (:mod:`tl_lightning.feature_cache`), so the
probe costs one pass over the data plus seconds of L-BFGS.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tl_lightning.feature_cache import cache_key, cached_features, dataset_fingerprint
from tl_lightning.modules.feature_extraction import weights_fingerprint


def _features(module: Any, dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    trainer = module.trainer
    key = cache_key(
        backbone=module.hparams.backbone,
        layer=module.hparams.layer,
        weights=weights_fingerprint(
            module.backbone
        ),  # the fingerprint FeatureExtractionModule's caches use
        data=dataset_fingerprint(dataset, repr(getattr(dataset, "transform", None))),
        dtype="float32",
        precision=str(trainer.precision),
    )
    args = dict(
        key=key,
        batch_size=getattr(trainer.datamodule, "batch_size", None) or 128,
        device=trainer.strategy.root_device,
        forward_context=trainer.precision_plugin.forward_context,
        desc=f"LP-FT: caching {split} features",
    )
    if (
        trainer.is_global_zero
    ):  # rank 0 fills the cache, the others then read it: one probe everywhere
        cached_features(module.backbone, dataset, **args)
    trainer.strategy.barrier("lp_ft_cache")
    cache = cached_features(module.backbone, dataset, **args)
    return torch.from_numpy(cache.features[:].copy()).float(), torch.from_numpy(cache.labels.copy())


def fit_head_with_probe(module: Any) -> Any:
    """Set ``module.head``'s Linear to the probe's ``(W, b)``; returns the probe's ``ProbeResult``.

    The probe trains on the train split's features and picks its L2 on the val split's (never on
    test). Runs on every rank on the same cached features, so DDP ranks start identical.
    """
    datamodule = module.trainer.datamodule
    train_set, val_set = (
        getattr(datamodule, "train_set", None),
        getattr(datamodule, "val_set", None),
    )
    if train_set is None or val_set is None:
        raise ValueError(
            "init_head: probe needs a datamodule with train_set and val_set after setup('fit')"
        )
    hp = getattr(datamodule, "hparams", {})
    if hp.get("augment", "none") != "none":
        rank_zero_warn(
            "init_head: probe sees the train split through its augmentation: one random draw per image"
        )
    train_f, train_y = _features(module, train_set, "train")
    val_f, val_y = _features(module, val_set, "val")
    result = probe_head(module, train_f, train_y, val_f, val_y)
    rank_zero_info(f"LP-FT: probe head fitted (l2={result.l2:g}, val acc {result.val_acc:.4f})")
    return result


def probe_head(
    module: Any,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
) -> Any:
    """Sweep the L-BFGS probe on given features and copy the chosen ``(W, b)`` into ``module.head[-1]``.

    The one way a module's linear head is set from a probe (LP-FT's ``init_head: probe`` and
    GradualUnfreezing's ``frozen_head: probe``). ``l2`` is chosen on ``val_x``/``val_y`` only.
    Returns the sweep's ``ProbeResult``.

    Example::

        result = probe_head(module, train_features, train_labels, val_features, val_labels)
        result.l2, result.val_acc
    """
    from tl_lightning.probe import sweep_logistic_regression

    linear = module.head[-1]
    device = linear.weight.device
    result = sweep_logistic_regression(
        train_x.to(device),
        train_y.to(device),
        val_x.to(device),
        val_y.to(device),
        module.hparams.num_classes,
    )
    with torch.no_grad():
        linear.weight.copy_(
            torch.as_tensor(result.weight, dtype=linear.weight.dtype).reshape(linear.weight.shape)
        )
        linear.bias.copy_(
            torch.as_tensor(result.bias, dtype=linear.bias.dtype).reshape(linear.bias.shape)
        )
    return result
