"""Untrusted files: crafted checkpoints never run code; archives never write outside their folder.

Complements tests/backbones/test_weights.py (crafted weights files) and tests/data/test_download.py
(zip/tar ``../``, absolute paths, zip symlinks, tar symlinks and hardlinks).
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from tl_lightning.checkpoint_safety import check_checkpoint, load_checkpoint_safely
from tl_lightning.cli import run_cli
from tl_lightning.data.download import extract_archive
from tl_lightning.errors import UnsafeFileError
from tl_lightning.modules.feature_extraction import FeatureExtractionModule

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
TINY_CLI = [
    "--model.init_args.backbone=resnet18",
    "--model.init_args.weights=null",
    "--data.init_args.image_size=16",
    "--trainer.logger=false",
    "--trainer.max_steps=1",
]


class WritesAFile:
    """Unpickling this runs ``touch <target>``: proof that code from the file was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture
def evil_ckpt(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would create ``marker``."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "state_dict": {"head.0.weight": torch.zeros(10, 512)},
            "hyper_parameters": {"num_classes": 10, "backbone": "resnet18", "weights": None},
            "pytorch-lightning_version": "2.6.0",
            "payload": WritesAFile(str(marker)),
        },
        path,
    )
    return path, marker


def test_load_from_checkpoint_refuses_a_crafted_pickle(evil_ckpt):
    path, marker = evil_ckpt
    with pytest.raises(Exception, match="(?i)weights only load failed|unsupported global"):
        FeatureExtractionModule.load_from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_ckpt_path_refuses_a_crafted_pickle_before_anything_runs(
    subcommand, evil_ckpt, tmp_path, monkeypatch
):
    path, marker = evil_ckpt
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        UnsafeFileError, match=r"refusing to load checkpoint .*evil.ckpt.*could run code"
    ):
        run_cli([subcommand, "--config", QUICKSTART, *TINY_CLI, f"--ckpt_path={path}"])
    assert not marker.exists()
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("*.csv"))  # nothing ran


def test_checkpoint_checks_refuse_a_crafted_pickle_and_accept_a_plain_one(evil_ckpt, tmp_path):
    path, marker = evil_ckpt
    with pytest.raises(UnsafeFileError, match="refusing to load"):
        load_checkpoint_safely(path)
    with pytest.raises(UnsafeFileError):
        check_checkpoint(path, model=None)
    assert not marker.exists()
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"num_classes": 2}}, plain)
    assert load_checkpoint_safely(plain)["hyper_parameters"] == {"num_classes": 2}
    assert load_checkpoint_safely("last") is None  # resolved later by the resume logic


# --- archives: what tests/data/test_download.py does not cover yet ----------------------------
def make_tar(
    path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None
) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return path


def file_member(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link_member(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("name", ["ok/../../evil.txt", "./../evil.txt", "ok/..\\..\\evil.txt"])
def test_tar_nested_traversal_is_refused(tmp_path, name):
    archive = make_tar(
        tmp_path / "bad.tgz",
        [file_member("ok.txt"), file_member(name)],
        {"ok.txt": b"ok", name: b"pwned"},
    )
    with pytest.raises(UnsafeFileError, match="outside the extraction folder"):
        extract_archive(archive, tmp_path / "out" / "deeper")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()


def test_tar_symlink_then_write_through_it_is_refused(tmp_path):
    # the classic: 'escape' -> '..', then 'escape/evil.txt' lands next to the target folder
    members = [link_member("escape", "..", tarfile.SYMTYPE), file_member("escape/evil.txt")]
    archive = make_tar(tmp_path / "bad.tgz", members, {"escape/evil.txt": b"pwned"})
    with pytest.raises(UnsafeFileError, match="link member 'escape'"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_tar_device_and_fifo_members_are_refused(tmp_path, kind):
    info = tarfile.TarInfo("dev")
    info.type = kind
    archive = make_tar(tmp_path / "bad.tgz", [info])
    with pytest.raises(UnsafeFileError, match="special member 'dev'"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["..\\evil.txt", "ok\\..\\..\\evil.txt", "\\evil.txt"])
def test_zip_backslash_traversal_is_refused(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        zf.writestr(zipfile.ZipInfo(name), b"pwned")
    with pytest.raises(UnsafeFileError, match="outside the extraction folder"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
