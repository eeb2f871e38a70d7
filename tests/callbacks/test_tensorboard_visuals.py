"""TensorBoard visuals: tiny fits write scalars, figures, histograms, embeddings and hparams."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torch.utils.data import Subset

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
from tests.helpers import TINY
from tl_lightning.callbacks.lr_monitor import LRMonitor
from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.callbacks.visual_utils import fixed_samples, viewable
from tl_lightning.callbacks.visuals import TensorBoardVisuals
from tl_lightning.cli import run_cli
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.data.digits_m import DigitsMSource
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.modules.dann import DANNModule
from tl_lightning.modules.feature_extraction import FeatureExtractionModule
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.modules.protonet import ProtoNetModule

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
KINDS = ("scalars", "images", "histograms", "tensors", "compressedHistograms", "audio")


class SmallDigits(DigitsDataModule):
    """Real digits at 16 px, cut to 96 train / 60 val / 60 test images so caching is quick."""

    def __init__(self, **kwargs):
        super().__init__(**{**TINY, "image_size": 16, "batch_size": 8, "num_workers": 0, **kwargs})

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.train_set = Subset(self.train_set, range(96))
        self.val_set, self.test_set = (
            Subset(self.val_set, range(60)),
            Subset(self.test_set, range(60)),
        )


def events(log_dir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={k: 0 for k in KINDS})
    acc.Reload()
    return acc


def trainer(tmp_path: Path, callbacks: list, logger, **kwargs) -> Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        limit_test_batches=2,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    return Trainer(callbacks=callbacks, logger=logger, **{**defaults, **kwargs})


def projector(log_dir: str | Path) -> list[dict]:
    """The projector_config.pbtxt entries, each with its tensors, metadata rows and sprite."""
    log_dir = Path(log_dir)
    text = (log_dir / "projector_config.pbtxt").read_text()
    entries = []
    for block in text.split("embeddings {")[1:]:
        fields = dict(
            line.strip().split(": ", 1) for line in block.splitlines() if ": " in line.strip()
        )
        folder = log_dir / fields["tensor_path"].strip('"').rsplit("/", 1)[0]
        with open(folder / "metadata.tsv") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        tensors = (folder / "tensors.tsv").read_text().strip().splitlines()
        entries.append(
            {
                "tag": fields["tensor_name"].strip('"'),
                "tensors": [[float(v) for v in line.split("\t")] for line in tensors],
                "metadata": rows,
                "sprite": Image.open(folder / "sprite.png").size,
            }
        )
    return entries


def hparams_session(acc: EventAccumulator) -> tuple[list[str], dict]:
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    metrics = [m.name.tag for m in experiment.experiment.metric_infos]
    return metrics, dict(start.session_start_info.hparams)


# --- helpers -------------------------------------------------------------------------------
def test_fixed_samples_are_seeded_and_skip_what_is_not_an_image():
    images = [(torch.full((3, 4, 4), float(i)), i % 3) for i in range(20)]
    mixed = images + [None, (torch.zeros(8), 1), (torch.zeros(3, 4, 4), "a/path.jpg")]
    first = fixed_samples([("val", mixed)], 10, seed=3)
    again = fixed_samples([("val", mixed)], 10, seed=3)
    assert (
        torch.equal(first.images, again.images) and first.labels.tolist() == again.labels.tolist()
    )
    # 10 draws from 23 items, 3 of them unusable: at least 7 images, each with its own label
    assert 7 <= len(first.labels) <= 10 and first.images.shape[1:] == (3, 4, 4)
    assert all(int(x[0, 0, 0]) % 3 == y for x, y in zip(first.images, first.labels.tolist()))
    features_only = [(torch.zeros(8), 0)] * 5
    assert fixed_samples([("val", features_only)], 4, seed=0) is None
    two = fixed_samples([("source", images), ("target", images)], 6, seed=0)
    assert two.split == ["source"] * 3 + ["target"] * 3


def test_viewable_undoes_the_backbone_normalisation():
    model = FeatureExtractionModule(num_classes=2, backbone="resnet18", weights=None)
    cfg = model.backbone.data_config
    rgb = torch.rand(2, 3, 5, 5)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(viewable((rgb - mean) / std, model), rgb)


# --- classifiers -----------------------------------------------------------------------------
def test_feature_extraction_fit_and_test_write_every_visual(tmp_path):
    seed_everything(0)
    # cached features: the val set becomes feature vectors, the visuals must still find images
    dm = SmallDigits()
    model = FeatureExtractionModule(
        num_classes=10, backbone="resnet18", weights=None, cache_dir=str(tmp_path / "cache")
    )
    logger = TensorBoardLogger(tmp_path, name="fe")
    visuals = TensorBoardVisuals(num_images=6, embedding_samples=40, thumbnail_size=8)
    fit = trainer(tmp_path, [LRMonitor(), visuals], logger, enable_checkpointing=True)
    fit.fit(model, dm)
    fit.test(model, dm, verbose=False)
    acc = events(logger.log_dir)
    tags = acc.Tags()

    for name in ("train/loss", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/f1_macro"):
        assert name in tags["scalars"], name
    assert "lr-AdamW/head" in tags["scalars"]  # per-group LRs by name
    assert "hp_metric" not in tags["scalars"]  # no placeholder metric
    assert "test/acc" in tags["scalars"]
    # one confusion matrix and one prediction grid per validation epoch (not the sanity check)
    for tag in ("val/confusion_matrix", "val/predictions"):
        steps = [im.step for im in acc.Images(tag)]
        assert steps == [2, 4], (tag, steps)
        assert all(im.width > 100 and im.height > 100 for im in acc.Images(tag))
    assert len(acc.Images("test/confusion_matrix")) == 1

    # the projector: 40 rows of features, class names as metadata, a sprite of 8 px thumbnails
    (entry,) = projector(logger.log_dir)
    assert entry["tag"].startswith("val/features")
    assert len(entry["tensors"]) == 40 and len(entry["tensors"][0]) == model.backbone.feature_dim
    labels = [row[0] for row in entry["metadata"]]
    assert len(labels) == 40 and set(labels) <= {str(i) for i in range(10)}
    assert len(set(labels)) > 3  # a seeded sample over the whole val split, not one class
    assert entry["sprite"] == (8 * math.ceil(math.sqrt(40)),) * 2
    # the same images every epoch: sampled once
    grid = visuals.parts[1]
    assert grid._samples is not None and len(grid._samples.labels) == 6

    # hparams with the final metrics (the run's real scalar tags)
    metrics, params = hparams_session(acc)
    assert {"val/acc", "val/loss", "val/f1_macro"} <= set(metrics)
    assert "hp_metric" not in metrics
    assert params["backbone"].string_value == "resnet18"
    assert params["image_size"].number_value == 16


def test_fine_tune_with_gradual_unfreezing_logs_phase_and_group_lrs(tmp_path):
    seed_everything(0)
    dm = SmallDigits()
    model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None)
    logger = TensorBoardLogger(tmp_path, name="ft")
    visuals = TensorBoardVisuals(images=False, embeddings=False, hparams=False)
    unfreeze = GradualUnfreezing(unfreeze_at_epoch=1)
    fit = trainer(tmp_path, [LRMonitor(), unfreeze, visuals], logger)
    fit.fit(model, dm)
    acc = events(logger.log_dir)
    scalars = acc.Tags()["scalars"]
    phase = [e.value for e in acc.Scalars("unfreezing/phase")]
    assert phase == [0.0, 1.0]
    assert any(t.startswith("lr-AdamW/backbone.") for t in scalars)
    assert "lr-AdamW/head" in scalars
    assert len(acc.Images("val/confusion_matrix")) == 2
    assert "val/predictions" not in acc.Tags()["images"]  # switched off
    assert not (Path(logger.log_dir) / "projector_config.pbtxt").exists()


# --- DANN --------------------------------------------------------------------------------------
def test_dann_logs_domain_scalars_and_projects_source_and_target(tmp_path):
    seed_everything(0)
    dm = DomainAdaptationDataModule(
        source=DigitsMSource(part="source", blend=False),
        target=DigitsMSource(part="target"),
        backbone="dann_cnn",
        weights=None,
        image_size=16,
        batch_size=8,
    )
    model = DANNModule(
        num_classes=10,
        backbone="dann_cnn",
        weights=None,
        head_hidden_dims=[16],
        domain_hidden_dims=[16],
        backbone_lr_scale=1.0,
        channels_last=False,
    )
    logger = TensorBoardLogger(tmp_path, name="dann")
    visuals = TensorBoardVisuals(num_images=4, embedding_samples=30, thumbnail_size=8)
    fit = trainer(tmp_path, [visuals], logger, max_epochs=1)
    fit.fit(model, dm)
    acc = events(logger.log_dir)
    scalars = acc.Tags()["scalars"]
    for name in ("train/grl_lambda", "train/domain_acc", "train/domain_acc_epoch", "val/source_acc", "val/target_acc"):
        assert name in scalars, name
    assert len(acc.Images("val/confusion_matrix")) == 1  # source val
    assert len(acc.Images("val/predictions")) == 1

    (entry,) = projector(logger.log_dir)
    header, *rows = entry["metadata"]
    assert header == ["label", "domain"]
    assert len(rows) == len(entry["tensors"]) == 30
    domains = [r[1] for r in rows]
    assert domains.count("source") == domains.count("target") == 15
    assert {r[0] for r in rows} <= {str(i) for i in range(10)}


# --- ProtoNet ----------------------------------------------------------------------------------
def protonet_fit(tmp_path: Path, name: str) -> tuple[Trainer, TensorBoardLogger]:
    seed_everything(0)
    dm = FewShotDataModule(
        "digits",
        backbone="conv4",
        weights=None,
        image_size=16,
        way=3,
        shot=1,
        query=2,
        train_episodes=2,
        val_episodes=5,
        test_episodes=8,
    )
    model = ProtoNetModule(backbone="conv4", weights=None, num_classes=3, channels_last=False)
    logger = TensorBoardLogger(tmp_path, name=name)
    visuals = TensorBoardVisuals(embedding_samples=24, thumbnail_size=8)
    fit = trainer(
        tmp_path, [visuals], logger, max_epochs=1, limit_val_batches=None, limit_test_batches=None
    )
    fit.fit(model, dm)
    fit.test(model, dm, verbose=False)
    return fit, logger


def test_protonet_logs_test_episode_histogram_and_embeddings(tmp_path):
    fit, logger = protonet_fit(tmp_path, "proto")
    acc = events(logger.log_dir)
    (hist,) = acc.Histograms("test/episode_acc")
    assert hist.histogram_value.num == 8  # one entry per test episode
    accs = fit.lightning_module.test_episode_accuracies
    assert hist.histogram_value.min == pytest.approx(float(accs.min()))
    assert hist.histogram_value.max == pytest.approx(float(accs.max()))
    assert "test/acc_ci95" in acc.Tags()["scalars"]
    # classifier-only visuals stay out of ProtoNet runs
    assert "val/predictions" not in acc.Tags()["images"]
    (entry,) = projector(logger.log_dir)
    assert len(entry["tensors"]) == len(entry["metadata"]) == 24
    # val/test classes of digits are 5-9: labels are the dataset's class names
    assert {row[0] for row in entry["metadata"]} <= {"5", "6", "7", "8", "9"}


def test_protonet_logs_val_episode_histogram(tmp_path):
    # needs ProtoNetModule to keep `val_episode_accuracies` (gathered like the test ones)
    _, logger = protonet_fit(tmp_path, "proto_val")
    (hist,) = events(logger.log_dir).Histograms("val/episode_acc")
    assert hist.histogram_value.num == 5


# --- no TensorBoard, CLI, DDP ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["none", "csv"])
def test_visuals_are_a_no_op_without_a_tensorboard_logger(tmp_path, kind):
    seed_everything(0)
    dm = SmallDigits()
    model = FeatureExtractionModule(
        num_classes=10, backbone="resnet18", weights=None, cache_features=False
    )
    logger = CSVLogger(tmp_path) if kind == "csv" else False
    fit = trainer(tmp_path, [TensorBoardVisuals()], logger, max_epochs=1, limit_val_batches=1)
    fit.fit(model, dm)
    fit.test(model, dm, verbose=False)
    assert not list(tmp_path.rglob("events.out.tfevents*"))
    assert not list(tmp_path.rglob("projector_config.pbtxt"))


def test_cli_installs_switchable_visuals_without_hp_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "fit",
            "--config",
            str(REPO / "configs/quickstart.yaml"),
            "--model.init_args.backbone=resnet18",
            "--model.init_args.weights=null",
            "--model.init_args.cache_features=false",
            "--data.init_args.image_size=16",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--visuals.images=false",
            "--visuals.embedding_samples=10",
        ]
    )
    (run,) = (tmp_path / "runs/quickstart").iterdir()
    acc = events(run)
    assert acc.Tags()["images"] == ["val/confusion_matrix"]  # images switched off
    # the quickstart config names its own TensorBoardLogger: the placeholder is still off
    assert "hp_metric" not in acc.Tags()["scalars"]
    assert "val/acc" in hparams_session(acc)[0]
    (entry,) = projector(run)
    assert len(entry["tensors"]) == 10


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import Subset
    sys.path.insert(0, {repo!r})
    from tl_lightning.callbacks.visuals import TensorBoardVisuals
    from tl_lightning.data.digits import DigitsDataModule
    from tl_lightning.modules.finetune import FineTuneModule

    class SmallDigits(DigitsDataModule):
        def setup(self, stage=None):
            super().setup(stage)
            self.train_set, self.val_set = Subset(self.train_set, range(64)), Subset(self.val_set, range(32))

    torch.set_num_threads(1)
    seed_everything(0)
    model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
                      limit_train_batches=2, limit_val_batches=2,
                      logger=TensorBoardLogger({out!r}, name="ddp"),
                      callbacks=[TensorBoardVisuals(num_images=4, embedding_samples=16)],
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    dm = SmallDigits(backbone="resnet18", weights=None, image_size=16, batch_size=8, num_workers=0)
    trainer.fit(model, dm)
    print("done rank", trainer.global_rank, trainer.global_step)
    """
)


def test_two_process_ddp_fit_writes_visuals_once_and_finishes(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done rank 0 2" in proc.stdout and "done rank 1 2" in proc.stdout
    (run,) = (tmp_path / "ddp").iterdir()
    acc = events(run)
    assert [im.step for im in acc.Images("val/confusion_matrix")] == [2]
    assert [im.step for im in acc.Images("val/predictions")] == [2]
    (entry,) = projector(run)  # rank 0 wrote it, once
    assert len(entry["tensors"]) == 16
