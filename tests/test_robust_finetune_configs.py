"""The robust fine-tuning configs run end to end through the CLI (tiny: a few steps, one epoch)."""

from __future__ import annotations

from pathlib import Path

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
