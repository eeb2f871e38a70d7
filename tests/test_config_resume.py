"""Every shipped config resumes: stopped mid-epoch and resumed with ``--ckpt_path last``, it ends
with the weights of the uninterrupted run (max |w diff| <= 1e-6).

The configs ``tests/test_resume_matrix.py`` already kills with a real SIGKILL are not run again
here; the first test checks that together the two files cover every config under ``configs/``
(trainer presets aside), so a new config without a resume case fails.

Each case keeps the config's module, datamodule class, LR scheduler, callbacks and augmentation,
at tiny sizes: 16-32 px, batches of 4, 3 train batches an epoch (``limit_train_batches``), 1-2
epochs, one thread. Every network becomes the registry's random-init ``conv4`` at 16 px (resnet50,
vgg16, efficientnet_b0 and efficientnet_lite0 would take most of the suite's time budget), except
in ``robust/lwf.yaml``: LwF distils from the ImageNet classifier, so it keeps efficientnet_lite0
with its weights at 32 px (and with it ForgettingMonitor's source-agreement path). Downloaded
datasets run on the fake CIFAR-10 / Flowers-102 / PetImages files of ``tests/data/conftest.py``,
in the real formats.

The kill is emulated: one run trains uninterrupted and, when it reaches the kill step, copies its
checkpoint folder as it stands (what a process killed at that moment leaves: checkpoints are
written atomically, and nothing after the kill gets there). The snapshot is then put back as the
run's checkpoint folder and the run is resumed through the CLI with ``--ckpt_path last``. A
kill at step 3 lands right after the epoch-0 checkpoint of an epoch cut by
``limit_train_batches`` (its last batch), the case that used to skip batches of the next epoch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback

from tests.data.conftest import (  # noqa: F401  (fixtures: the fake datasets in real formats)
    cifar10_files,
    cifar10_patched,
    class_folder,
    flowers102_files,
    flowers102_patched,
    petimages_root,
    petimages_zip,
)
from tests.test_resume_matrix import CONFIG_CASES, TOL, max_weight_diff
from tl_lightning.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
        "--checkpoint.every_n_train_steps=2"]  # fmt: skip
BATCH = ["--data.init_args.batch_size=4"]  # the episodic datamodule has none: one episode a step
CONV4 = ["--model.init_args.backbone=conv4", "--model.init_args.weights=null",
         "--data.init_args.image_size=16"]  # fmt: skip
NO_WORKERS = ["--data.init_args.num_workers=0"]
SMALL_DIGITS = [*BATCH, "--data.init_args.split=[0.1, 0.05, 0.85]"]  # 179 train images
DANN = [*CONV4, *BATCH, "--trainer.max_epochs=-1", "--trainer.max_steps=6",
        "--trainer.val_check_interval=3"]  # fmt: skip

# config -> (overrides, fake data it reads, kill step). Saves every 2 steps and after each
# validation (at every epoch's end). A kill at step 2 resumes mid-epoch (batch 2 of 3, one epoch
# in all); at step 3 from the checkpoint after epoch 0's last batch, at step 5 from batch 1 of
# epoch 1 (two epochs in all).
FILES = [*CONV4, *BATCH, *NO_WORKERS]
CASES = {
    "cats_dogs/feature_extraction_resnet50.yaml": (FILES, "pets", 2),
    "cats_dogs/feature_extraction_vgg16.yaml": (FILES, "pets", 5),
    "cifar10/feature_extraction_resnet50.yaml": (FILES, "cifar", 2),
    "cifar10/finetune_resnet50.yaml": (FILES, "cifar", 3),
    "dann/catsdogs_to_cifar10.yaml": (DANN, "pets+cifar", 3),
    # the L-BFGS solve is the fit's one step (at on_train_start, again on resume): stopped
    # after it, mid-epoch, the resumed run re-solves, validates and stops like the full one
    "digits/linear_probe_lbfgs.yaml": (
        [*CONV4, *SMALL_DIGITS, "--checkpoint.every_n_train_steps=1"], None, 1),
    # unfrozen from epoch 0 here, so the resumed epoch 1 runs at the backbone LR grown 2x
    "digits/gradual_backbone_finetuning.yaml": (
        [*CONV4, *SMALL_DIGITS, "--trainer.callbacks.unfreeze_at_epoch=0"], None, 5),
    "flowers102/finetune_efficientnet_b0.yaml": (FILES, "flowers", 5),
    "folder/image_folder.yaml": (FILES, "folder", 2),
    "protonet/flowers102_5way_5shot.yaml": (
        [*CONV4, *NO_WORKERS, "--data.init_args.way=2", "--data.init_args.shot=1",
         "--data.init_args.query=1", "--data.init_args.train_way=3",
         "--data.init_args.train_query=1", "--data.init_args.train_episodes=3",
         "--data.init_args.val_episodes=1"], "flowers", 2),
    # LwF distils from the ImageNet classifier: efficientnet_lite0 with its weights (32 px)
    "robust/lwf.yaml": (SMALL_DIGITS, None, 2),
    "robust/l2sp.yaml": ([*CONV4, *SMALL_DIGITS], None, 2),
    "robust/lp_ft.yaml": ([*CONV4, *SMALL_DIGITS], None, 2),
    "robust/plain.yaml": ([*CONV4, *SMALL_DIGITS], None, 2),
    "robust/wise_ft.yaml": ([*CONV4, *SMALL_DIGITS], None, 2),
}  # fmt: skip


def shipped_configs() -> set[str]:
    return {
        p.relative_to(ROOT / "configs").as_posix()
        for p in (ROOT / "configs").rglob("*.yaml")
        if p.parent.name != "trainer"
    }


def test_every_shipped_config_has_a_resume_case():
    by_sigkill = {config for config, _, _ in CONFIG_CASES.values()}
    assert not by_sigkill & set(CASES)  # each config is run once
    assert by_sigkill | set(CASES) == shipped_configs()


class SnapshotAt(Callback):
    """Copy the checkpoint folder as it stands when training reaches ``step`` to ``folder``:
    what a process killed at that moment would have left on disk."""

    def __init__(self, step: int, folder: str) -> None:
        self.step, self.folder = step, folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not os.path.exists(self.folder):
            shutil.copytree(trainer.checkpoint_callback.dirpath, self.folder)

    def on_validation_start(self, trainer, pl_module) -> None:
        # a run that stops mid-epoch (the L-BFGS probe after its one solve step) has no next
        # batch: it is killed in its final validation, after the step's checkpoint
        if trainer.should_stop:
            self.on_train_batch_start(trainer, pl_module, None, None)


def shrink_callbacks(config: dict) -> dict:
    """The robust configs' callbacks at tiny sizes (same callbacks, fewer reference images)."""
    for callback in config.get("trainer", {}).get("callbacks", []) or []:
        name, args = callback["class_path"], callback.setdefault("init_args", {})
        if name.endswith("ForgettingMonitor"):
            args.update(num_images=4, image_size=32)
        if name.endswith("WiseFT"):
            args.update(grid=[0.0, 1.0], num_reference_images=4, reference_image_size=32)
    return config


def point_at_fake_data(config: dict, kind: str | None, request) -> dict:
    """Set the config's data root(s) to the fake data in real formats (no download happens:
    the files are there and their checksums are the fixtures')."""
    fixtures = {
        "cifar": "cifar10_patched",
        "flowers": "flowers102_patched",
        "pets": "petimages_root",
    }
    roots = {}
    for part in kind.split("+") if kind else []:
        if part == "folder":
            roots[part] = request.getfixturevalue("class_folder")({"cat": 14, "dog": 14})
        else:
            value = request.getfixturevalue(fixtures[part])
            roots[part] = value if isinstance(value, Path) else value.root
    data = config["data"]["init_args"]
    if kind == "pets+cifar":  # DANN: Cats-vs-Dogs -> CIFAR-10 cat/dog, loaded in this process
        data["num_workers"] = 0
        for side, part in (("source", "pets"), ("target", "cifar")):
            data[side]["init_args"]["root"] = str(roots[part])
    elif kind:  # a datamodule's root, or its source's (few-shot)
        data.get("source", {}).get("init_args", data)["root"] = str(roots[kind])
    return config


@pytest.mark.parametrize("config", sorted(CASES))
def test_shipped_config_resumes_to_the_uninterrupted_weights(
    config, tmp_path, monkeypatch, request
):
    overrides, data, kill_step = CASES[config]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    text = yaml.safe_load((ROOT / "configs" / config).read_text())
    text = point_at_fake_data(shrink_callbacks(text), data, request)
    (tmp_path / "case.yaml").write_text(yaml.safe_dump(text))
    epochs = 1 if kill_step < 3 else 2
    common = ["--config", "case.yaml", *TINY, f"--trainer.max_epochs={epochs}", *overrides]
    snapshot = tmp_path / "at_kill"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one float reduction order in every run
    try:
        full = run_cli(["fit", *common, "--trainer.callbacks+=tests.test_config_resume.SnapshotAt",
                        f"--trainer.callbacks.step={kill_step}",
                        f"--trainer.callbacks.folder={snapshot}"])  # fmt: skip
        folder = Path(full.trainer.checkpoint_callback.dirpath)
        outputs = {"last.ckpt": folder / "last.ckpt"}
        for callback in full.trainer.callbacks:  # WiSE-FT's chosen weights, saved at fit end
            if type(callback).__name__ == "WiseFT":
                outputs["wise_ft.ckpt"] = callback.checkpoint_path
        for name, path in outputs.items():
            if path.exists():
                shutil.move(path, tmp_path / f"uninterrupted_{name}")
        shutil.rmtree(folder)
        shutil.copytree(snapshot, folder)  # the disk as the killed run left it
        at_kill = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        resumed = run_cli(["fit", *common, "--ckpt_path", "last"])
    finally:
        torch.set_num_threads(threads)
    # the resume point: the last save before the kill (every 2 steps, and at epoch 0's end: 3)
    assert at_kill["global_step"] == {1: 1, 2: 2, 3: 3, 5: 4}[kill_step]
    assert resumed.trainer.global_step == full.trainer.global_step
    assert Path(resumed.trainer.checkpoint_callback.dirpath) == folder  # same run folder
    compared = 0
    for name, path in outputs.items():
        if (tmp_path / f"uninterrupted_{name}").exists():
            diff = max_weight_diff(tmp_path / f"uninterrupted_{name}", path)
            print(f"{config} ({name}): max |w diff| = {diff:.3g}")  # for the record (-s)
            assert diff <= TOL, f"{config}, {name}: max |w diff| {diff:.3g}"
            compared += 1
    assert compared == 1 + (config == "robust/wise_ft.yaml")
