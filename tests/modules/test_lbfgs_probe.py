"""FeatureExtractionModule(probe="lbfgs"): the head is the validation-chosen L-BFGS solution, saved
in a checkpoint that predicts, with the sweep in the logs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from tests.helpers import TINY, quick_trainer, tiny_digits
from tl_lightning.modules import FeatureExtractionModule
from tl_lightning.probe import fit_logistic_regression

GRID = [1e-1, 1e-3]
TOL = 1e-6  # tight, so that the head is the optimum and not where one trajectory stopped


def _image_features(model, dataset):
    """Features of every image of ``dataset`` by a plain loop over the backbone (no cache)."""
    xs, ys = zip(*(dataset[i][:2] for i in range(len(dataset))))
    with torch.no_grad():
        return model.backbone.eval()(torch.stack(xs)), torch.tensor(ys)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lbfgs")
    torch.manual_seed(0)
    model = FeatureExtractionModule(
        num_classes=10,
        probe="lbfgs",
        probe_grid=GRID,
        probe_tol=TOL,
        cache_dir=str(tmp_path / "cache"),
        **TINY,
    )
    dm = tiny_digits()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    counter = _BatchCounter()
    trainer = quick_trainer(
        tmp_path,
        max_epochs=5,
        limit_train_batches=None,
        limit_val_batches=None,
        logger=TensorBoardLogger(tmp_path / "tb", name="probe"),
        enable_checkpointing=True,
        callbacks=[checkpoint, counter],
    )
    trainer.fit(model, dm)
    model.batches_started = counter.started  # for the test below
    return model, dm, trainer, checkpoint


class _BatchCounter(Callback):
    def __init__(self):
        self.started = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started += 1


def test_the_solved_epoch_runs_one_batch_not_the_whole_train_set(fitted):
    model, _, trainer, checkpoint = fitted
    assert trainer.num_training_batches >= 10  # enough batches for the difference to show
    # batch 0 records the solve as the optimizer step, then the epoch validates and ends
    assert model.batches_started == 1
    assert trainer.global_step == 1 and checkpoint.best_model_path  # validated and checkpointed


def test_head_is_the_validation_best_lbfgs_fit_and_training_stops(fitted):
    model, dm, trainer, _ = fitted
    assert trainer.current_epoch == 1  # one epoch of five: the solve is the whole fit
    # independent: features by hand from the image datasets, one fit per strength, best on val
    dm2 = tiny_digits()
    dm2.setup("fit")
    train_x, train_y = _image_features(model, dm2.train_set)
    val_x, val_y = _image_features(model, dm2.val_set)
    accs = {}
    for l2 in GRID:
        w, b = fit_logistic_regression(train_x.double(), train_y, 10, l2, tol=1e-8)
        accs[l2] = ((val_x.float() @ w.T + b).argmax(1) == val_y).float().mean().item()
    best = max(GRID, key=lambda l2: (accs[l2], l2))
    assert model.probe_result.l2 == best
    assert dict(model.probe_result.curve) == pytest.approx(accs, abs=1.5 / len(val_y))
    w, b = fit_logistic_regression(train_x.double(), train_y, 10, best, tol=1e-8)
    torch.testing.assert_close(model.head[-1].weight, w, atol=2e-3, rtol=2e-3)
    head_b = model.head[-1].bias
    torch.testing.assert_close(head_b - head_b.mean(), b - b.mean(), atol=2e-3, rtol=2e-3)
    # Lightning's own validation of the stored head agrees with the sweep
    assert trainer.callback_metrics["val/acc"].item() == pytest.approx(
        model.probe_result.val_acc, abs=1e-6
    )


def test_checkpoint_predicts_with_the_solved_head(fitted):
    model, _, _, checkpoint = fitted
    loaded = FeatureExtractionModule.load_from_checkpoint(checkpoint.best_model_path).eval()
    assert loaded.hparams.probe == "lbfgs"
    images = _some_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval()(images))
    torch.testing.assert_close(loaded.head[-1].weight, model.probe_result.weight)


def _some_images():
    dm = tiny_digits()
    dm.setup("fit")
    return torch.stack([dm.val_set[i][0] for i in range(4)])


def test_sweep_is_in_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, _, trainer, _ = fitted
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0}).Reload()
    curve = [(e.step, e.value) for e in events.Scalars("probe/val_acc")]
    assert [v for _, v in curve] == pytest.approx([acc for _, acc in model.probe_result.curve])
    assert [
        v for _, v in sorted((e.step, e.value) for e in events.Scalars("probe/l2"))
    ] == pytest.approx(GRID)
    assert "probe/val_acc_vs_l2" in events.Tags()["images"]


def test_lbfgs_rejects_what_its_objective_cannot_honour():
    with pytest.raises(ValueError, match="head: 'mlp'"):
        FeatureExtractionModule(num_classes=10, probe="lbfgs", head="mlp", **TINY)
    with pytest.raises(ValueError, match="label_smoothing"):
        FeatureExtractionModule(num_classes=10, probe="lbfgs", label_smoothing=0.1, **TINY)
    with pytest.raises(ValueError, match="probe must be one of"):
        FeatureExtractionModule(num_classes=10, probe="adam", **TINY)


def test_lbfgs_needs_cached_features(tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    model = FeatureExtractionModule(num_classes=10, probe="lbfgs", probe_grid=GRID, **TINY)
    with pytest.raises(ValueError, match="augment: none"):
        quick_trainer(tmp_path).fit(model, tiny_digits(augment="basic"))


def test_shipped_config_fits_and_checkpoints(tmp_path, monkeypatch):
    from pathlib import Path

    from tl_lightning.cli import run_cli

    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[2] / "configs" / "digits" / "linear_probe_lbfgs.yaml"
    cli = run_cli(
        [
            "fit",
            "--config",
            str(config),
            "--model.init_args.backbone=resnet18",
            "--model.init_args.weights=null",
            "--model.init_args.probe_grid=[0.01]",
            "--data.init_args.image_size=32",
            "--data.init_args.num_workers=0",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    model = cli.model
    assert model.probe_result is not None and model.probe_result.l2 == 0.01
    ckpts = sorted(Path(tmp_path).rglob("*.ckpt"))
    assert ckpts  # the CLI's checkpoint(s), written although no gradient step ran
    for ckpt in ckpts:
        loaded = FeatureExtractionModule.load_from_checkpoint(ckpt)
        torch.testing.assert_close(loaded.head[-1].weight, model.head[-1].weight)
