"""``tl-lightning advise`` end to end: the report, a config that round-trips and fits, bad folders."""

from __future__ import annotations

import importlib

import pytest
import yaml

from tests.advisor.conftest import make_folder
from tests.helpers import print_config
from tl_lightning.advisor.config import advised_config, write_config
from tl_lightning.advisor.rule import STRATEGIES, settings_for
from tl_lightning.cli import run_cli
from tl_lightning.errors import DataError


def user_config(tmp_path, root) -> str:
    path = tmp_path / "my.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "class_path": "tl_lightning.modules.FeatureExtractionModule",
                    "init_args": {"backbone": "resnet18", "weights": None},
                },
                "data": {
                    "class_path": "tl_lightning.data.image_folder.ImageFolderDataModule",
                    "init_args": {
                        "root": str(root),
                        "image_size": 32,
                        "batch_size": 8,
                        "num_workers": 0,
                    },
                },
                "trainer": {"accelerator": "cpu", "logger": False},
            }
        )
    )
    return str(path)


ADVISE_FAST = ["--budget_minutes", "0.5", "--folds", "2", "--timing_batches", "2"]


@pytest.fixture
def advised(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "advise",
            "--config",
            user_config(tmp_path, folder.root),
            "--out",
            "advised.yaml",
            *ADVISE_FAST,
        ]
    )
    return tmp_path / "advised.yaml", capsys.readouterr().out


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _subset(small: dict, big: dict) -> None:
    """Every key written in ``small`` has the same value in ``big`` (recursively); class paths
    name the same class (jsonargparse prints the shortest import path)."""
    for key, value in small.items():
        if isinstance(value, dict):
            _subset(value, big[key])
        elif key == "class_path":
            assert _resolve(big[key]) is _resolve(value), (value, big[key])
        else:
            assert big[key] == value, (key, value, big[key])


def test_advise_prints_the_numbers_and_writes_a_config_that_round_trips_and_fits(advised, capsys):
    path, report = advised
    for line in (
        "images per split",
        "linear probe",
        "BatchNorm shift",
        "seconds per epoch",
        "strategy",
        "wrote",
    ):
        assert line in report
    assert "broken files       2" in report  # the two broken bee files of the fixture
    written = yaml.safe_load(path.read_text())
    printed = print_config(["fit", "--config", str(path)], capsys)
    _subset({k: written[k] for k in ("model", "data")}, yaml.safe_load(printed))
    _subset(written["trainer"], yaml.safe_load(printed)["trainer"])
    cli = run_cli(["fit", "--config", str(path), "--trainer.fast_dev_run=true"])
    assert cli.trainer.state.finished


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_the_config_of_every_strategy_round_trips_and_fits(strategy, advised, tmp_path, capsys):
    from tl_lightning.advisor.command import build_datamodule, load_config
    from tl_lightning.advisor.rule import Evidence

    user = load_config([str(tmp_path / "my.yaml")], [])
    evidence = Evidence(20, 3, 5, 0.5, 0.5, 1.5, dict.fromkeys(STRATEGIES, 1.0), 60.0, 5, 8)
    rec = settings_for(strategy, evidence)
    config = advised_config(rec, user["data"], "resnet18", None, user["trainer"])
    path = write_config(config, tmp_path / f"{strategy}.yaml", rec.reasons)
    first = print_config(["fit", "--config", str(path)], capsys)
    (tmp_path / "dumped.yaml").write_text(first)
    assert yaml.safe_load(first) == yaml.safe_load(
        print_config(["fit", "--config", str(tmp_path / "dumped.yaml")], capsys)
    )
    _subset(config["model"], yaml.safe_load(first)["model"])
    cli = run_cli(["fit", "--config", str(path), "--trainer.fast_dev_run=true"])
    assert cli.trainer.state.finished
    assert type(cli.model).__name__ == (
        "FeatureExtractionModule" if strategy == "feature_extraction" else "FineTuneModule"
    )
    assert (
        build_datamodule(user).hparams.backbone == "resnet18"
    )  # the model's backbone reached the data


def test_a_broken_folder_gives_the_same_error_as_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = make_folder(tmp_path / "bad", {"ant": 5}, {"bee": 3})  # every bee file is broken
    config = user_config(tmp_path, bad.root)
    with pytest.raises(DataError) as from_fit:
        run_cli(["fit", "--config", config, "--trainer.fast_dev_run=true"])
    with pytest.raises(DataError) as from_advise:
        run_cli(["advise", "--config", config, "--out", "advised.yaml", *ADVISE_FAST])
    assert str(from_advise.value) == str(from_fit.value)
    assert "bee" in str(from_fit.value) and "readable" in str(from_fit.value)
    assert not (tmp_path / "advised.yaml").exists()


def test_config_overrides_and_a_missing_data_section(tmp_path):
    from tl_lightning.advisor.command import load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  init_args:\n    batch_size: 8\n")
    config = load_config(
        [str(path)], ["--data.init_args.batch_size=16", "--model.init_args.weights=null"]
    )
    assert (
        config["data"]["init_args"]["batch_size"] == 16
        and config["model"]["init_args"]["weights"] is None
    )
    path.write_text("model: {}\n")
    with pytest.raises(SystemExit, match="no 'data' section"):
        load_config([str(path)], [])
