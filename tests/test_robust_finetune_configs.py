"""The robust fine-tuning configs run end to end through the CLI (tiny: a few steps, one epoch)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tl_lightning.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_wise_ft_config_fits_with_lp_ft_and_saves_the_chosen_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    config = yaml.safe_load((ROOT / "configs/robust/wise_ft.yaml").read_text())
    monitor, wise = config["trainer"]["callbacks"]  # shrunk: 4 reference images, a in {0, 1}
    monitor["init_args"].update(num_images=4, image_size=64)
    wise["init_args"].update(grid=[0.0, 1.0], num_reference_images=4, reference_image_size=64)
    config["data"]["init_args"]["split"] = [0.1, 0.1, 0.8]  # small train/val splits: a quick probe and WiSE-FT sweep
    small = tmp_path / "wise_ft.yaml"
    small.write_text(yaml.safe_dump(config))
    cli = run_cli([
        "fit", "--config", str(small),
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
        "--trainer.logger=false", "--checkpoint.dirpath=ckpt",
    ])
    assert bool(cli.model.head_from_probe)
    metrics = cli.trainer.callback_metrics
    assert "val/source_agreement" in metrics and "val/cka_drift" in metrics
    assert (tmp_path / "wise_ft.ckpt").is_file()
    from tl_lightning.callbacks import WiseFT

    (wise_cb,) = [c for c in cli.trainer.callbacks if isinstance(c, WiseFT)]
    assert [row["a"] for row in wise_cb.result.curve] == [0.0, 1.0]
    assert "source_agreement" in wise_cb.result.curve[0]


# What each config is for decides its BatchNorm policy: the forgetting-control methods keep the
# pretrained statistics (re-estimating them erases the source task); plain FT is the usual baseline.
BN_KEPT = {"plain.yaml": False, "l2sp.yaml": True, "lwf.yaml": True, "lp_ft.yaml": True, "wise_ft.yaml": True}


def _batchnorms(backbone):
    return [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", sorted(BN_KEPT))
def test_each_config_s_bn_policy_reaches_the_module(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cli = run_cli(["--config", str(ROOT / "configs/robust" / name), "--trainer.logger=false"], run=False)
    model = cli.model
    model.train()  # what Lightning calls every epoch
    bns = _batchnorms(model.backbone)
    assert len(bns) > 40  # EfficientNet-Lite0's
    before = [bn.running_mean.clone() for bn in bns]
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32) * 2 - 1)  # a training-mode forward on target-like inputs
    moved = [not torch.equal(b, bn.running_mean) for b, bn in zip(before, bns)]
    kept = BN_KEPT[name]
    assert all(not bn.training for bn in bns) == kept
    assert not any(moved) if kept else all(moved)
    assert all(bn.weight.requires_grad for bn in bns)  # affine weights train either way


def test_lp_ft_configs_fine_tune_with_a_smaller_lr_than_plain_fine_tuning():
    def lr(name):
        config = yaml.safe_load((ROOT / "configs/robust" / name).read_text())
        return config["model"]["init_args"]["optimizer"]["init_args"]["lr"]

    assert lr("lp_ft.yaml") == lr("wise_ft.yaml") < lr("plain.yaml")  # Kumar et al.: a smaller LR after the probe
