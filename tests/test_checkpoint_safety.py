"""--ckpt_path with a file a tl-lightning run did not write: a clear error naming what it lacks."""

from __future__ import annotations

import warnings

import pytest
import torch

from tl_lightning.checkpoint_safety import check_lightning_checkpoint
from tl_lightning.cli import run_cli


def test_bare_state_dict_is_named_for_what_it_lacks(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.ones(2, 2)}, path)
    with pytest.raises(ValueError, match="lacks 'state_dict'.*'pytorch-lightning_version'.*"
                       "'hyper_parameters'.*bare state_dict"):  # fmt: skip
        run_cli(["fit", "--config", "configs/quickstart.yaml", "--ckpt_path", str(path)])


def test_partial_checkpoint_names_only_the_missing_key(tmp_path):
    ckpt = {"state_dict": {}, "pytorch-lightning_version": "2.6.0"}
    with pytest.raises(ValueError, match="lacks 'hyper_parameters'") as info:
        check_lightning_checkpoint(ckpt, tmp_path / "x.ckpt")
    assert "state_dict'" not in str(info.value).split("lacks")[1].split(";")[0]
    check_lightning_checkpoint({**ckpt, "hyper_parameters": {}}, "ok.ckpt")  # complete: passes
    with pytest.raises(ValueError, match="holds a Tensor"):
        check_lightning_checkpoint(torch.ones(1), "t.pt")


def test_cli_from_the_command_line_does_not_warn_about_args(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["tl-lightning", "fit", "--config", "configs/quickstart.yaml",
                                     "--print_config"])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        run_cli()
    assert "class_path: tl_lightning.data.DigitsDataModule" in capsys.readouterr().out
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
