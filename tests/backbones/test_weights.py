"""Weights from files: safetensors and plain torch files load; pickled code never runs."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision

from tl_lightning.backbones import build_backbone
from tl_lightning.errors import UnsafeFileError, WeightsUnavailableError


def _reference_resnet18() -> torch.nn.Module:
    torch.manual_seed(1)
    return torchvision.models.resnet18()


def test_safetensors_file_loads_every_tensor(tmp_path):
    from safetensors.torch import save_file

    ref = _reference_resnet18()
    path = tmp_path / "resnet18.safetensors"
    save_file(ref.state_dict(), str(path))
    bb = build_backbone("resnet18", weights=str(path))
    assert torch.equal(bb.body.conv1.weight, ref.conv1.weight)
    assert torch.equal(bb.body.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)


def test_torch_file_and_prefixed_keys_load(tmp_path):
    ref = _reference_resnet18()
    path = tmp_path / "resnet18.pt"
    # a Lightning-style checkpoint of our own module: keys prefixed with 'backbone.body.'
    torch.save({"state_dict": {f"backbone.body.{k}": v for k, v in ref.state_dict().items()}}, path)
    bb = build_backbone("resnet18", weights=str(path))
    assert torch.equal(bb.body.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)


def test_wrong_architecture_weights_are_refused(tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="do not fit"):
        build_backbone("resnet18", weights=str(path))


class _WritesAFile:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _WritesAFile(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        build_backbone("resnet18", weights=str(path))
    assert not marker.exists()


def test_missing_and_corrupt_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "nope.pt"))
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        build_backbone("resnet18", weights=str(bad))
