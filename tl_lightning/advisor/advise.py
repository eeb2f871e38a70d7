"""``advise()``: describe the data, measure how far they are from the pretraining and what each
strategy costs here, recommend one, and write a config that ``tl-lightning fit`` runs as is."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tl_lightning.advisor.bn_stats import BN_STATS_FILE, BatchNormInputs
from tl_lightning.advisor.config import advised_config, write_config
from tl_lightning.advisor.describe import DataDescription, describe_data
from tl_lightning.advisor.distance import (
    Distance,
    choose_folds,
    kfold_knn_accuracy,
    kfold_probe_accuracy,
)
from tl_lightning.advisor.rule import (
    STRATEGIES,
    Evidence,
    Recommendation,
    advised_batch_size,
    recommend,
)
from tl_lightning.advisor.timing import Timing, measure_timing, steps_per_epoch, wait_for_device
from tl_lightning.backbones import build_backbone
from tl_lightning.feature_cache import cache_key, cached_features, dataset_fingerprint
from tl_lightning.modules.feature_extraction import weights_fingerprint
from tl_lightning.precision import mixed_precision_for

log = logging.getLogger(__name__)


@dataclass
class Advice:
    """What :func:`advise` measured and recommends; ``config_path`` is the written config."""

    description: DataDescription
    distance: Distance
    timing: Timing
    evidence: Evidence
    recommendation: Recommendation
    config: dict
    config_path: Path | None
    seconds: float  # wall time of the whole advice
    phases: dict[str, float]  # seconds of each part: data, embedding (+ BN statistics), probe, knn,
    # timing, config


def data_section(datamodule) -> dict:
    """``{"class_path", "init_args"}`` that rebuild ``datamodule`` (from its saved hyperparameters)."""
    cls = type(datamodule)
    return {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "init_args": _plain(dict(datamodule.hparams)),
    }


def _plain(value):
    """Tuples to lists, recursively: YAML-safe values for the config."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _forward_context(precision: str, device: torch.device):
    if precision in ("bf16-mixed", "16-mixed"):
        from lightning.pytorch.plugins.precision import MixedPrecision

        return MixedPrecision(precision, device.type).forward_context
    return nullcontext


class _TimedForward:
    """A ``forward_context`` for :func:`cached_features` that also times each backbone call."""

    def __init__(self, inner, device: torch.device):
        self.inner, self.device, self.seconds = inner, device, []

    @contextlib.contextmanager
    def __call__(self):
        wait_for_device(self.device)
        start = time.perf_counter()
        with self.inner():
            yield
        wait_for_device(self.device)
        self.seconds.append(time.perf_counter() - start)

    def per_image(self, num_images: int, batch_size: int) -> float | None:
        """Seconds per image of the timed calls, the first (warm-up) left out when there are more."""
        if not self.seconds:
            return None
        if len(self.seconds) == 1:
            return self.seconds[0] / max(1, min(num_images, batch_size))
        return sum(self.seconds[1:]) / max(1, num_images - batch_size)


@dataclass
class Embedding:
    """The training split embedded once: features, labels, the BatchNorm shift over the same
    images, and the frozen forward's seconds per image (``None`` on a cache hit)."""

    features: torch.Tensor
    labels: torch.Tensor
    bn_shift: float
    forward_per_image: float | None


@torch.inference_mode()
def _frozen_pass(backbone, dataset, batch_size: int, device: torch.device, forward_context):
    """One eval-mode forward pass over ``dataset`` whose outputs are dropped: the BatchNorm
    statistics when the features were cached without them (by a feature-extraction fit)."""
    from torch.utils.data import DataLoader

    from tl_lightning.data.decode import skip_failed_collate

    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=skip_failed_collate)
    was_training = backbone.training
    backbone.eval()
    try:
        for batch in loader:
            if batch:
                with forward_context():
                    backbone(batch[0].to(device))
    finally:
        backbone.train(was_training)


def embed_train_split(
    backbone, datamodule, precision: str, device: torch.device, cache_dir=None
) -> Embedding:
    """Features and labels of the training split, from the feature cache (filled when absent), and
    the BatchNorm input statistics of the same pass.

    The key is the one :class:`FeatureExtractionModule` uses under ``precision``, so a
    feature-extraction fit of the same data reads these features instead of recomputing them. The
    BN statistics are gathered by hooks during the caching pass (eval mode, every training image
    once) and kept beside the features; a cache that lacks them (written by a fit) gets one
    forward pass over the split to measure them, once. ``backbone`` is moved to ``device`` and
    to channels-last memory format, in place.
    """
    dataset = datamodule.train_set
    key = cache_key(
        backbone=datamodule.hparams.backbone,
        layer=None,
        weights=weights_fingerprint(
            backbone
        ),  # the fingerprint FeatureExtractionModule's caches use
        data=dataset_fingerprint(dataset, repr(getattr(dataset, "transform", None))),
        dtype="float32",
        precision=precision,
    )
    # channels-last, as a fit's module converts its backbone (3-4x faster convolutions on CPU)
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    timed = _TimedForward(_forward_context(precision, device), device)
    with BatchNormInputs(backbone) as bn:
        cache = cached_features(
            backbone,
            dataset,
            key=key,
            cache_dir=cache_dir,
            batch_size=datamodule.batch_size,
            device=device,
            forward_context=timed,
            desc="embedding the training split",
        )
        stats_file = cache.folder / BN_STATS_FILE
        if bn.seen:  # the features were computed in this pass
            bn.save(stats_file)
        elif not bn.load(stats_file):
            _frozen_pass(backbone, dataset, datamodule.batch_size, device, timed)
            bn.save(stats_file)
    return Embedding(
        torch.from_numpy(np.array(cache.features, dtype=np.float32)),
        torch.from_numpy(cache.labels),
        bn.shift(),
        timed.per_image(len(dataset), datamodule.batch_size),
    )


def _train_batches(datamodule, n: int, batch_size: int) -> tuple[list, float]:
    """``n`` training batches of ``batch_size`` and the median seconds to fetch one.

    Batches come from the datamodule's own loader (decoding included), re-cut to the advised
    batch size: steps are timed at the size the advised run will use.
    """
    chunks, times = [], []
    loader = iter(datamodule.train_dataloader())
    while len(chunks) < n:
        start = time.perf_counter()
        try:
            batch = next(loader)
        except StopIteration:
            break
        times.append((time.perf_counter() - start) * batch_size / len(batch[0]))
        chunks += list(zip(batch[0].split(batch_size), batch[1].split(batch_size), strict=True))
    times = sorted(times[1:] or times)  # the first fetch starts the workers
    return chunks[:n], times[len(times) // 2]


def advise(
    datamodule,
    budget_minutes: float = 10.0,
    folds: int = 5,
    timing_batches: int = 3,
    lr_find: bool = False,
    lr_find_steps: int = 50,
    out: str | Path | None = "advised.yaml",
    trainer: dict | None = None,
    data: dict | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
) -> Advice:
    """Advise a transfer strategy for ``datamodule`` (any :class:`ImageDataModule`).

    Args:
        datamodule: the data, with ``backbone``/``weights`` set to the pretrained network to use.
        budget_minutes: training time you can spend; epochs are fitted to it on measured timings.
        folds: k of the k-fold linear probe and k-NN (fewer when the smallest class is smaller).
        timing_batches: training batches timed per strategy, at most (the full fine-tuning step's
            first only warms up; timing stops once two steps agree within 10 %).
        lr_find: run Lightning's LR range test on the advised model for the learning rate.
        lr_find_steps: training steps of that test (Lightning's ``num_training``).
        out: where to write the advised config (``None``: do not write).
        trainer, data: the user's ``trainer`` / ``data`` config sections to keep (the CLI passes
            them); ``data`` defaults to one rebuilt from the datamodule's hyperparameters.
        cache_dir: feature cache folder (default ``$TL_LIGHTNING_CACHE``).
        device: ``cpu`` or ``cuda`` (default: cuda when available).

    Example:
        >>> from tl_lightning.data import DigitsDataModule
        >>> advice = advise(DigitsDataModule(image_size=32), budget_minutes=2)  # doctest: +SKIP
        >>> advice.recommendation.strategy  # doctest: +SKIP
        'full_finetune'
    """
    start = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [start]

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark[0]
        mark[0] = now

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    datamodule.prepare_data()  # a broken folder fails here, exactly as in `fit`
    datamodule.setup("fit")
    if datamodule.test_set is None:
        with contextlib.suppress(ValueError):  # no test split configured: described as absent
            datamodule.setup("test")
    description = describe_data(datamodule)
    hp = datamodule.hparams
    backbone = build_backbone(hp.backbone, weights=hp.weights)
    lap("data")

    fe_precision = mixed_precision_for(device)  # what `precision: mixed` gives a feature extraction
    embedding = embed_train_split(backbone, datamodule, fe_precision, device, cache_dir)
    features, labels = embedding.features, embedding.labels
    lap("embedding")
    k = choose_folds(labels.numpy(), folds)
    probe_acc = kfold_probe_accuracy(features, labels, datamodule.num_classes, k)
    lap("probe")
    knn_acc = kfold_knn_accuracy(features, labels, datamodule.num_classes, k)
    lap("knn")
    distance = Distance(probe_acc=probe_acc, knn_acc=knn_acc, bn_shift=embedding.bn_shift, folds=k)

    batch_size = advised_batch_size(description.num_train, datamodule.batch_size)
    batches, load = _train_batches(datamodule, max(2, timing_batches), batch_size)
    per_image = embedding.forward_per_image
    train_precision = "32-true" if device.type == "cpu" else fe_precision
    timing = measure_timing(
        backbone,
        batches,
        datamodule.num_classes,
        train_steps=steps_per_epoch(description.num_train, batch_size, drop_last=True),
        val_steps=steps_per_epoch(description.splits.get("val", 0), batch_size, False),
        precision=train_precision,
        device=device,
        load=load,
        frozen_forward=None if per_image is None else per_image * batch_size,
        frozen_precision=fe_precision,
    )
    lap("timing")
    evidence = Evidence(
        num_train=description.num_train,
        num_classes=description.num_classes,
        per_class_min=description.per_class_min,
        probe_acc=distance.probe_acc,
        knn_acc=distance.knn_acc,
        bn_shift=distance.bn_shift,
        epoch_seconds={s: timing.epoch_seconds(s) for s in STRATEGIES},
        budget_seconds=budget_minutes * 60.0,
        num_groups=len(backbone.group_names()),
        batch_size=datamodule.batch_size,
        device=device.type,
    )
    rec = recommend(evidence)
    data = data or data_section(datamodule)
    config = advised_config(rec, data, hp.backbone, hp.weights, trainer)
    if lr_find:
        from tl_lightning.advisor.lr import find_lr

        lr = find_lr(config, num_training=lr_find_steps)
        if lr is not None:
            evidence = dataclasses.replace(evidence, lr=lr)
            rec = recommend(evidence)
            rec.reasons.append(("lr_find suggestion", f"{lr:.3g}", "base learning rate"))
            config = advised_config(rec, data, hp.backbone, hp.weights, trainer)
    path = write_config(config, out, rec.reasons) if out is not None else None
    lap("lr_find and config" if lr_find else "config")
    return Advice(
        description,
        distance,
        timing,
        evidence,
        rec,
        config,
        path,
        time.perf_counter() - start,
        phases,
    )
