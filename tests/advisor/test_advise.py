"""``advise()`` from Python: it shares the feature cache with a feature-extraction fit, and its
config carries the measured numbers and the lr_find suggestion."""

from __future__ import annotations

from pathlib import Path

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
