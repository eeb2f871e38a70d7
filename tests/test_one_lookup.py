"""A run resolves its backbone name once and probes the network at most once."""

from __future__ import annotations

import pytest

import tl_lightning.backbones.registry as registry
import tl_lightning.config_checks as config_checks
from tl_lightning.backbones import register_backbone
from tl_lightning.backbones.backbone import Backbone
from tl_lightning.cli import run_cli


@pytest.fixture
def counts(monkeypatch):
    seen = {"lookups": [], "probes": 0}
    lookup, probe, forward_ok = (
        registry._lookup,
        Backbone._probe_feature_dim,
        config_checks._forward_ok,
    )

    def counting_lookup(name):
        seen["lookups"].append(name)
        return lookup(name)

    def counting_probe(self):
        seen["probes"] += 1
        return probe(self)

    def counting_forward_ok(backbone, size):
        seen["probes"] += 1
        return forward_ok(backbone, size)

    monkeypatch.setattr(registry, "_RESOLVED", {})
    monkeypatch.setattr(registry, "_lookup", counting_lookup)
    monkeypatch.setattr(Backbone, "_probe_feature_dim", counting_probe)
    monkeypatch.setattr(config_checks, "_forward_ok", counting_forward_ok)
    return seen


def test_quickstart_fit_resolves_the_backbone_once_and_probes_once(counts, tmp_path, monkeypatch):
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    config = str(registry.__file__).rsplit("/tl_lightning/", 1)[0] + "/configs/quickstart.yaml"
    run_cli(["fit", "--config", config, "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
             "--model.init_args.weights", "null"])  # fmt: skip
    # config check, datamodule preprocessing and module all asked; one lookup answered them
    assert counts["lookups"] == ["efficientnet_lite0"]
    assert counts["probes"] == 1


def test_a_backbone_name_is_registered_once():
    with pytest.raises(ValueError, match="'conv4' is already registered"):
        register_backbone("conv4", data_config=lambda weights: None)(lambda weights, layer: None)
