"""Bad configuration stops before training with a message naming the key or value and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image
from torch import nn

from tests.helpers import TINY, quick_trainer
from tl_lightning.backbones import Backbone, DataConfig, build_backbone
from tl_lightning.backbones.registry import register_backbone
from tl_lightning.cli import run_cli
from tl_lightning.config_checks import check_input_size
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.modules.feature_extraction import FeatureExtractionModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY_CLI = [
    "--model.init_args.backbone=resnet18",
    "--model.init_args.weights=null",
    "--data.init_args.image_size=32",
    "--trainer.fast_dev_run=true",
    "--trainer.logger=false",
]
SMALL = {**TINY, "image_size": 16, "batch_size": 4, "num_workers": 0}


def cli_error(args: list[str], capsys) -> str:
    """The error text ``tl-lightning <args>`` prints before exiting with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    return err[err.index("error:") :]


# --- keys and types ----------------------------------------------------------------------------
def test_misspelled_model_key_names_the_closest_option(capsys):
    err = cli_error(
        ["fit", "--config", QUICKSTART, *TINY_CLI, "--model.init_args.head_dropuot=0.2"], capsys
    )
    first = err.splitlines()[0]
    assert "unknown option 'head_dropuot'" in first and "FeatureExtractionModule" in first
    assert "did you mean 'head_dropout'" in first


def test_misspelled_nested_optimizer_key_points_at_the_optimizer(capsys):
    args = [
        "fit",
        "--config",
        QUICKSTART,
        *TINY_CLI,
        "--model.init_args.optimizer.init_args.lrr=0.1",
    ]
    first = cli_error(args, capsys).splitlines()[0]
    assert "unknown option 'lrr' for torch.optim.AdamW; did you mean 'lr'?" in first


def test_misspelled_top_level_key_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("modle:\n  class_path: tl_lightning.modules.FeatureExtractionModule\n")
    first = cli_error(["fit", "--config", str(cfg)], capsys).splitlines()[0]
    assert "unknown key 'modle'; did you mean 'model'?" in first


def test_misspelled_class_path_suggests_the_class(capsys):
    args = ["fit", "--config", QUICKSTART, "--model=tl_lightning.modules.FeatureExtractionModul"]
    first = cli_error(args, capsys).splitlines()[0]
    assert "no class 'FeatureExtractionModul'" in first
    assert "did you mean 'FeatureExtractionModule'" in first


def test_wrong_type_names_the_key_and_the_expected_type(tmp_path, capsys):
    args = ["fit", "--config", QUICKSTART, *TINY_CLI, "--data.init_args.batch_size=lots"]
    first = cli_error(args, capsys).splitlines()[0]
    assert "'batch_size' must be int, got 'lots'" in first


# --- backbone names and weights tags -----------------------------------------------------------
def test_unknown_backbone_in_a_config_stops_before_building(monkeypatch):
    import tl_lightning.data.base as data_base

    built = []
    monkeypatch.setattr(data_base.ImageDataModule, "__init__", lambda *a, **k: built.append(1))
    args = [
        "fit",
        "--config",
        QUICKSTART,
        "--model.init_args.backbone=resnet5",
        "--trainer.logger=false",
    ]
    with pytest.raises(
        ValueError,
        match=r"^model.init_args.backbone: unknown backbone 'resnet5'; did you mean 'resnet50'",
    ):
        run_cli(args)
    assert not built  # checked from the parsed config, before any class is instantiated


def test_unknown_weights_tag_names_the_key_and_the_valid_tags():
    args = [
        "fit",
        "--config",
        QUICKSTART,
        "--model.init_args.backbone=resnet18",
        "--model.init_args.weights=IMAGENET1K_V7",
        "--trainer.logger=false",
    ]
    with pytest.raises(
        ValueError,
        match=r"^model.init_args.weights: unknown weights 'IMAGENET1K_V7'.*IMAGENET1K_V1",
    ):
        run_cli(args)


def test_backbone_suggestions_are_distinct_and_keep_the_prefix():
    with pytest.raises(ValueError) as info:
        build_backbone("resnet5", weights=None)
    message = str(info.value)
    assert "did you mean 'resnet50'" in message and message.count("'resnet50'") == 1
    with pytest.raises(ValueError, match="did you mean 'timm/resnet18'"):
        build_backbone("timm/resnt18", weights=None)
    with pytest.raises(
        ValueError, match="unknown backbone source 'torchvison'.*did you mean 'torchvision'"
    ):
        build_backbone("torchvison/resnet18", weights=None)


# --- image sizes the backbone cannot take ------------------------------------------------------
def _tiny_valid_conv(weights: str | None, layer: str | None) -> Backbone:
    """Three unpadded 5x5 convolutions: needs at least 13 px input (a too-small-input case)."""
    body = nn.Sequential(
        nn.Conv2d(3, 4, 5), nn.ReLU(), nn.Conv2d(4, 4, 5), nn.ReLU(), nn.Conv2d(4, 8, 5)
    )
    config = DataConfig(input_size=32)
    return Backbone(body, config, [("convs", ["0", "2", "4"])], name="tiny_valid_conv")


register_backbone("tiny_valid_conv", data_config=lambda weights: DataConfig(input_size=32))(
    _tiny_valid_conv
)


def write_class_folder(root: Path, classes: list[str], per_class: int = 6, size: int = 16) -> Path:
    """``root/{class}/{i}.png``: solid colours, class ``c`` in red channel ``40 * (c + 1)``."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (40 * (c + 1), 10 * i, 0)
            Image.new("RGB", (size, size), colour).save(root / name / f"{i}.png")
    return root


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def test_image_too_small_for_the_network_stops_before_the_first_step(tmp_path):
    folder = write_class_folder(tmp_path / "imgs", ["a", "b"])
    dm = ImageFolderDataModule(
        str(folder),
        backbone="tiny_valid_conv",
        weights=None,
        image_size=8,
        batch_size=4,
        num_workers=0,
    )
    model = FeatureExtractionModule(
        num_classes=2,
        backbone="tiny_valid_conv",
        weights=None,
        class_names=["a", "b"],
        cache_features=False,  # the cache forward would fail first (see the report on base.py)
    )
    steps = CountSteps()
    with pytest.raises(
        ValueError,
        match=r"image_size=8 is too small or wrong for backbone 'tiny_valid_conv'.*use image_size >= 16",
    ):
        quick_trainer(tmp_path, callbacks=[steps]).fit(model, datamodule=dm)
    assert steps.steps == 0


def test_check_input_size_passes_a_size_that_works_and_keeps_the_mode():
    backbone = _tiny_valid_conv(None, None)
    backbone.train()
    check_input_size(backbone, 16, "tiny_valid_conv")
    with pytest.raises(ValueError, match="image_size=12"):
        check_input_size(backbone, 12, "tiny_valid_conv", native=32)
    assert backbone.training  # the probe runs in eval mode and restores the caller's mode


def test_fixed_size_vit_refuses_another_image_size(tmp_path):
    folder = write_class_folder(tmp_path / "imgs", ["a", "b"])
    with pytest.raises(ValueError, match=r"only takes 224px input; image_size=64 cannot work"):
        ImageFolderDataModule(
            str(folder), backbone="torchvision/vit_b_16", weights=None, image_size=64
        )


# --- num_classes / class names: checkpoint vs data ---------------------------------------------
def folder_config(tmp_path: Path, root: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"""
model:
  class_path: tl_lightning.modules.feature_extraction.FeatureExtractionModule
  init_args: {{backbone: resnet18, weights: null}}
data:
  class_path: tl_lightning.data.image_folder.ImageFolderDataModule
  init_args: {{root: {root}, image_size: 16, batch_size: 4, num_workers: 0, predict_dir: {root / "cat"}}}
trainer: {{accelerator: cpu, logger: false, max_epochs: 1, limit_train_batches: 1, limit_val_batches: 1}}
prediction_writer: {{output: {tmp_path / "preds.csv"}}}
"""
    )
    return cfg


@pytest.fixture(scope="module")
def three_class_ckpt(tmp_path_factory) -> Path:
    """A checkpoint written by ``tl-lightning fit`` on classes ['cat', 'dog', 'fox']."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = folder_config(tmp, write_class_folder(tmp / "imgs", ["cat", "dog", "fox"]))
    run_cli(
        [
            "fit",
            "--config",
            str(cfg),
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp}",  # config.yaml goes there, not to the cwd
            f"--checkpoint.dirpath={tmp}",
        ]
    )
    return tmp / "last.ckpt"


@pytest.mark.parametrize("subcommand", ["fit", "test", "predict"])
def test_ckpt_path_with_other_num_classes_is_refused(
    subcommand, three_class_ckpt, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    root = write_class_folder(tmp_path / "two", ["cat", "dog"])
    cfg = folder_config(tmp_path, root)
    with pytest.raises(
        ValueError,
        match=r"num_classes mismatch: checkpoint .* predicts 3 classes \['cat', 'dog', 'fox'\] but the data has 2",
    ):
        run_cli([subcommand, "--config", str(cfg), f"--ckpt_path={three_class_ckpt}"])


def test_ckpt_path_with_same_count_but_other_classes_is_refused(
    three_class_ckpt, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    root = write_class_folder(tmp_path / "other", ["ant", "cat", "dog"])
    cfg = folder_config(tmp_path, root)
    with pytest.raises(
        ValueError, match=r"class_names mismatch.*\['cat', 'dog', 'fox'\].*\['ant', 'cat', 'dog'\]"
    ):
        run_cli(["predict", "--config", str(cfg), f"--ckpt_path={three_class_ckpt}"])


def test_ckpt_path_with_matching_classes_runs(three_class_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_class_folder(tmp_path / "same", ["cat", "dog", "fox"])
    cfg = folder_config(tmp_path, root)
    cli = run_cli(["test", "--config", str(cfg), f"--ckpt_path={three_class_ckpt}"])
    assert cli.model.class_names == ["cat", "dog", "fox"]


def test_missing_ckpt_path_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = folder_config(tmp_path, write_class_folder(tmp_path / "d", ["cat", "dog"]))
    with pytest.raises(FileNotFoundError, match="--ckpt_path 'nope.ckpt' does not exist"):
        run_cli(["test", "--config", str(cfg), "--ckpt_path=nope.ckpt"])


@pytest.mark.parametrize("stage", ["fit", "test"])
def test_loaded_checkpoint_used_with_other_data_stops_before_any_step(
    stage, three_class_ckpt, tmp_path
):
    model = FeatureExtractionModule.load_from_checkpoint(three_class_ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = ImageFolderDataModule(str(write_class_folder(tmp_path / "two", ["cat", "dog"])), **SMALL)
    steps = CountSteps()
    trainer = quick_trainer(tmp_path, callbacks=[steps])
    with pytest.raises(
        ValueError,
        match=r"the model predicts 3 classes \['cat', 'dog', 'fox'\] but ImageFolderDataModule has 2",
    ):
        getattr(trainer, stage)(model, datamodule=dm)
    assert steps.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loaded_checkpoint_with_reordered_classes_is_refused(three_class_ckpt, tmp_path):
    model = FeatureExtractionModule.load_from_checkpoint(three_class_ckpt)
    dm = ImageFolderDataModule(
        str(write_class_folder(tmp_path / "re", ["ant", "cat", "dog"])), **SMALL
    )
    with pytest.raises(ValueError, match="class_names mismatch"):
        quick_trainer(tmp_path).test(model, datamodule=dm)
    # the same classes in the same order are fine
    same = ImageFolderDataModule(
        str(write_class_folder(tmp_path / "ok", ["cat", "dog", "fox"])), **SMALL
    )
    results = quick_trainer(tmp_path).test(model, datamodule=same)
    assert np.isfinite(results[0]["test/loss"])


def test_class_name_checks_refuse_reordered_names_and_allow_display_names():
    from types import SimpleNamespace

    from tl_lightning.config_checks import check_model_matches_data

    model = SimpleNamespace(hparams={"num_classes": 3, "class_names": ["cat", "dog", "fox"]})
    check_model_matches_data(model, 3, ["cat", "dog", "fox"], "Data")  # same: fine
    with pytest.raises(ValueError, match="class_names mismatch"):
        check_model_matches_data(model, 3, ["dog", "cat", "fox"], "Data")  # reordered
    with pytest.raises(ValueError, match="num_classes mismatch"):
        check_model_matches_data(model, 2, ["cat", "dog"], "Data")
    with pytest.warns(UserWarning, match="assuming the same classes"):
        check_model_matches_data(model, 3, ["0", "1", "2"], "Data")  # other names: display names
