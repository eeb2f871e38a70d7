"""The tl-lightning command: configs round-trip, fit/predict work end to end, mistakes are named."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import print_config
from tl_lightning.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "trainer")
TRAINER_PRESETS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
TINY = ["--model.init_args.backbone=resnet18", "--model.init_args.weights=null", "--data.init_args.image_size=32"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_round_trips_throughprint_config(config, tmp_path, capsys):
    first = print_config(["fit", "--config", str(config)], capsys)
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(first)
    second = print_config(["fit", "--config", str(dumped)], capsys)
    assert yaml.safe_load(first) == yaml.safe_load(second)


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_presets_compose_with_the_quickstart(preset, capsys):
    out = print_config(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(preset)], capsys)
    assert yaml.safe_load(out)["trainer"]["accelerator"] == yaml.safe_load(preset.read_text())["trainer"]["accelerator"]


def test_preprocessing_and_classes_are_linked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.fast_dev_run=true", "--trainer.logger=false"])
    assert cli.datamodule.data_config == cli.model.backbone.data_config
    assert cli.model.hparams.num_classes == 10 and cli.model.class_names == [str(i) for i in range(10)]


def test_whole_batch_limits_are_counts_and_decimals_fractions(tmp_path, monkeypatch, capsys):
    # Lightning 2.6's signature reads Union[float, int] at runtime, so "2" was parsed as 2.0
    monkeypatch.chdir(tmp_path)
    limits = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=0.5", "--trainer.limit_predict_batches=1.0"]
    printed = yaml.safe_load(print_config(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *limits], capsys))["trainer"]
    assert [(printed[f"limit_{s}_batches"], type(printed[f"limit_{s}_batches"])) for s in ("train", "val", "test", "predict")] == [(2, int), (1, int), (0.5, float), (1.0, float)]
    cli = run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY, *limits, "--trainer.max_epochs=1", "--trainer.logger=false", "--checkpoint.dirpath=ckpt"])
    assert cli.trainer.num_training_batches == 2 and cli.trainer.global_step == 2
    assert cli.trainer.num_val_batches == [1]


def test_fit_then_predict_a_folder_to_csv(tmp_path, monkeypatch):
    from PIL import Image
    from sklearn.datasets import load_digits

    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs/quickstart.yaml")
    run_cli(["fit", "--config", config, *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.logger=false", "--checkpoint.dirpath=ckpt"])
    images = tmp_path / "images"
    images.mkdir()
    for i, arr in enumerate(load_digits().images[:5]):
        Image.fromarray((arr * 15).astype("uint8")).save(images / f"digit{i}.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    run_cli(["predict", "--config", config, *TINY, "--ckpt_path=ckpt/last.ckpt", f"--data.init_args.predict_dir={images}", "--prediction_writer.output=preds.csv", "--trainer.logger=false"])
    with open(tmp_path / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["file"]).name for r in rows) == [f"digit{i}.png" for i in range(5)]
    assert all(r["class"] in [str(i) for i in range(10)] and 0 < float(r["probability"]) <= 1 for r in rows)


def test_misspelled_key_is_named(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.lr_decayy=0.5"])
    assert "lr_decayy" in capsys.readouterr().err


def test_unknown_backbone_is_named_with_a_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((SystemExit, ValueError)) as err:
        run_cli(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--model.init_args.backbone=resnet5", "--trainer.fast_dev_run=true"])
    assert "resnet50" in str(err.value) or "resnet50" in str(err.value.__context__)


def test_module_entry_point_lists_backbones():
    out = subprocess.run([sys.executable, "-m", "tl_lightning", "backbones"], capture_output=True, text=True, check=True).stdout
    assert "efficientnet_lite0" in out
