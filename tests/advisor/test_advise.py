"""``advise()`` from Python: it shares the feature cache with a feature-extraction fit, and its
config carries the measured numbers and the lr_find suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tl_lightning.advisor import advise
from tl_lightning.advisor.config import advised_config
from tl_lightning.advisor.rule import DEFAULT_LR, Recommendation, advised_batch_size
from tl_lightning.advisor.timing import steps_per_epoch
from tl_lightning.data import DigitsDataModule
from tl_lightning.modules import FeatureExtractionModule
from tl_lightning.precision import TLTrainer

SMALL = dict(backbone="resnet18", weights=None, image_size=32, split=(0.2, 0.4, 0.4))


def _caches(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if (p / "labels.npy").is_file())


def test_a_feature_extraction_fit_reads_the_features_advise_cached(tmp_path):
    # pretrained weights: a random init would differ between the two builds, and so would the key
    pretrained = {**SMALL, "backbone": "efficientnet_lite0", "weights": "DEFAULT"}
    cache = tmp_path / "cache"
    advice = advise(
        DigitsDataModule(**pretrained), out=tmp_path / "a.yaml", cache_dir=str(cache), folds=3
    )
    assert len(_caches(cache)) == 1  # the training split
    n = advice.description.num_train
    bs = advised_batch_size(n, 64)
    assert advice.timing.train_steps == steps_per_epoch(n, bs, drop_last=True)
    assert (
        yaml.safe_load((tmp_path / "a.yaml").read_text())["data"]["init_args"]["batch_size"] == bs
    )

    model = FeatureExtractionModule(
        num_classes=10, backbone="efficientnet_lite0", cache_dir=str(cache)
    )
    trainer = TLTrainer(
        max_epochs=1,
        precision="mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=DigitsDataModule(**pretrained))
    assert len(_caches(cache)) == 2  # + validation; the training split was a cache hit


def test_lr_find_sets_the_learning_rate_of_the_written_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = DigitsDataModule(**{**SMALL, "split": (0.1, 0.45, 0.45)}, batch_size=16)
    advice = advise(
        data, out="a.yaml", cache_dir=str(tmp_path / "c"), folds=3, lr_find=True, lr_find_steps=20
    )
    rec = advice.recommendation
    written = yaml.safe_load(Path("a.yaml").read_text())
    assert written["model"]["init_args"]["optimizer"]["init_args"]["lr"] == rec.lr
    assert rec.lr != DEFAULT_LR[rec.strategy] and rec.lr > 0
    assert any(what == "lr_find suggestion" for what, _, _ in rec.reasons)


def test_config_moves_backbone_to_the_model_and_sets_the_advised_values():
    rec = Recommendation("gradual_unfreezing", None, "stats", 7, 16, "32-true", 1e-3)
    data = {
        "class_path": "x.Y",
        "init_args": {"backbone": "resnet50", "weights": "V2", "root": "r", "batch_size": 64},
    }
    trainer = {
        "max_epochs": 99,
        "precision": "bf16-mixed",
        "accelerator": "cpu",
        "callbacks": [{"class_path": "z"}],
    }
    cfg = advised_config(rec, data, "resnet18", None, trainer)
    assert cfg["data"]["init_args"] == {"root": "r", "batch_size": 16}
    assert data["init_args"]["backbone"] == "resnet50"  # the caller's dict is not modified
    assert (
        cfg["model"]["init_args"]["backbone"] == "resnet18"
        and cfg["model"]["init_args"]["weights"] is None
    )
    assert cfg["trainer"]["max_epochs"] == 7 and cfg["trainer"]["precision"] == "32-true"
    assert cfg["trainer"]["accelerator"] == "cpu"
    [callback] = cfg["trainer"]["callbacks"]
    assert (
        callback["class_path"].endswith("GradualUnfreezing")
        and callback["init_args"]["bn"] == "stats"
    )
    last = advised_config(
        Recommendation("last_groups", 2, "eval", 5, 64, "32-true", 2e-3), data, "r", None
    )
    assert (
        last["model"]["init_args"]["train_groups"] == 2
        and last["model"]["init_args"]["bn"] == "eval"
    )
    assert "callbacks" not in last["trainer"]


def _independent_bn_shift(backbone, dataset, precision: str, batch_size: int) -> float:
    """Every BN layer's input over the whole split (dataset order, eval mode, the embedding's
    precision and memory layout), summed in float64 by hand, and the shift formula."""
    import torch

    from tl_lightning.advisor.bn_stats import batchnorm_layers

    layers = batchnorm_layers(backbone)
    sums = {name: [0, 0.0, 0.0] for name in layers}

    def hook(name):
        def record(module, args):
            x = args[0].double().transpose(0, 1).reshape(args[0].shape[1], -1)
            s = sums[name]
            s[0] += x.shape[1]
            s[1] = s[1] + x.sum(1)
            s[2] = s[2] + (x * x).sum(1)

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    backbone.eval().to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if precision.startswith("bf16") else None
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        for start in range(0, len(dataset), batch_size):
            idx = range(start, min(start + batch_size, len(dataset)))
            backbone(torch.stack([dataset[i][0] for i in idx]))
    for h in handles:
        h.remove()
    per_layer = []
    for name, m in layers.items():
        n, s1, s2 = sums[name]
        mean, var = s1 / n, s2 / n - (s1 / n) ** 2
        mu_run, sd_run = m.running_mean.double(), (m.running_var.double() + m.eps).sqrt()
        sd = (var + m.eps).sqrt()
        per_layer.append(((mean - mu_run).abs() / sd_run + (sd / sd_run).log().abs()).mean())
    return float(torch.stack(per_layer).mean())


def test_the_bn_shift_is_measured_over_the_whole_training_split_cached_or_not(tmp_path):
    import torch

    from tl_lightning.advisor.advise import embed_train_split
    from tl_lightning.advisor.bn_stats import BN_STATS_FILE
    from tl_lightning.backbones import build_backbone
    from tl_lightning.precision import mixed_precision_for

    pretrained = {**SMALL, "backbone": "efficientnet_lite0", "weights": "DEFAULT"}
    dm = DigitsDataModule(**{**pretrained, "split": (0.1, 0.45, 0.45)})
    dm.setup("fit")
    cpu, precision, cache = torch.device("cpu"), mixed_precision_for("cpu"), tmp_path / "cache"

    def embed():
        return embed_train_split(
            build_backbone("efficientnet_lite0", weights="DEFAULT"), dm, precision, cpu, cache
        )

    expected = _independent_bn_shift(
        build_backbone("efficientnet_lite0", weights="DEFAULT"),
        dm.train_set,
        precision,
        dm.batch_size,
    )
    cold = embed()  # computes the features and, in the same pass, the BN statistics
    assert cold.bn_shift == pytest.approx(expected, abs=1e-6)
    assert cold.forward_per_image > 0
    [folder] = _caches(cache)
    assert (folder / BN_STATS_FILE).is_file()

    hit = embed()  # features and statistics both read back: no pass at all
    assert hit.bn_shift == cold.bn_shift and hit.forward_per_image is None
    assert torch.equal(hit.features, cold.features)

    (folder / BN_STATS_FILE).unlink()  # as a feature-extraction fit leaves its cache
    again = embed()
    assert again.bn_shift == pytest.approx(expected, abs=1e-6)
    assert (folder / BN_STATS_FILE).is_file() and _caches(cache) == [folder]
