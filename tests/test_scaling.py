"""Scaling out: precision by capability, trainer presets, and every classifier module under CPU DDP."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch import seed_everything
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import Strategy
from PIL import Image

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
import tl_lightning.precision as precision
from tests.helpers import print_config, quick_trainer
from tl_lightning.cli import run_cli
from tl_lightning.data import DigitsDataModule
from tl_lightning.data.dataset import ImageFilesDataset
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.precision import TLTrainer, mixed_precision_for, resolve_precision

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["cpu", "gpu", "ddp", "multinode", "fsdp"]
TASK = "configs/digits/finetune.yaml"

# devices=1 with batch B vs devices=2 with batch B/2 (FineTuneModule on a BN-free backbone)
EQUIV = dict(batch=16, steps=6, val_batches=4, image_size=16)
EQUIV_MODEL = dict(num_classes=10, backbone="dann_cnn", weights=None, channels_last=False)


# --- precision chosen by capability ------------------------------------------------------------
@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_gpu_mixed_precision_follows_bf16_support(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert mixed_precision_for("cuda") == expected
    assert mixed_precision_for(torch.device("cuda", 3)) == expected
    assert resolve_precision("mixed", "gpu") == expected


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma"}, "32-true"),  # AVX2 only: bf16 autocast 3-16x slower than fp32
        ({"avx2", "avx512f"}, "32-true"),  # AVX-512 without BF16 still emulates bf16
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bf16-mixed"),
    ],
)
def test_cpu_mixed_precision_needs_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    assert mixed_precision_for("cpu") == expected
    assert resolve_precision("mixed", "cpu") == expected
    trainer = TLTrainer(accelerator="cpu", precision="mixed", logger=False)
    assert trainer.precision == expected


def test_auto_accelerator_resolves_on_the_device_it_will_use(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_precision("mixed", "auto") == "16-mixed"
    assert resolve_precision("mixed", None) == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("mixed", "auto") == "32-true"
    assert mixed_precision_for("mps") == "32-true"
    assert resolve_precision("mixed", "tpu") == "32-true"
    assert resolve_precision("mixed", CPUAccelerator()) == "32-true"
    assert resolve_precision("mixed", CUDAAccelerator()) == "16-mixed"


def test_sync_batchnorm_on_cpu_fails_up_front_with_the_fix():
    with pytest.raises(ValueError, match="sync_batchnorm: false"):
        TLTrainer(accelerator="cpu", devices=2, strategy="ddp", sync_batchnorm=True, logger=False)


@pytest.mark.parametrize("value", ["bf16-mixed", "16-mixed", "32-true", 32, None])
def test_explicit_precision_passes_through_untouched(value):
    assert resolve_precision(value, "gpu") == value


# --- presets compose with task configs ---------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_a_task_config_and_overrides_its_trainer(preset, capsys):
    out = print_config(
        ["fit", "--config", TASK, "--config", f"configs/trainer/{preset}.yaml"], capsys
    )
    trainer = yaml.safe_load(out)["trainer"]
    wanted = yaml.safe_load((REPO / f"configs/trainer/{preset}.yaml").read_text())["trainer"]
    assert trainer["precision"] == "mixed"  # the task config's 32-true is overridden
    for key in ("accelerator", "devices", "num_nodes", "sync_batchnorm"):
        if key in wanted:
            assert trainer[key] == wanted[key], key
    # the task's own settings survive composition
    assert (
        trainer["max_epochs"] == yaml.safe_load((REPO / TASK).read_text())["trainer"]["max_epochs"]
    )


def test_cpu_preset_fits_with_the_precision_this_cpu_runs_fastest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(REPO / TASK),
            "--config",
            str(REPO / "configs/trainer/cpu.yaml"),
            "--model.init_args.backbone=resnet18",
            "--model.init_args.weights=null",
            "--data.init_args.image_size=32",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
        ]
    )
    assert cli.trainer.precision == _fastest_cpu_precision()
    assert cli.trainer.global_step == 1


def _fastest_cpu_precision() -> str:
    """What this CPU should get, read from /proc/cpuinfo here, not from the code under test."""
    path = Path("/proc/cpuinfo")
    text = path.read_text() if path.is_file() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    return "bf16-mixed" if flags & {"avx512_bf16", "amx_bf16"} else "32-true"


def test_fsdp_preset_wraps_each_vit_encoder_block():
    from torchvision.models.vision_transformer import EncoderBlock

    from tl_lightning.backbones import build_backbone

    cfg = yaml.safe_load((REPO / "configs/trainer/fsdp.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=str | Strategy)
    strategy = parser.instantiate_classes(
        parser.parse_object({"strategy": cfg["strategy"]})
    ).strategy
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy._state_dict_type == "full"  # one file, reloadable in one process
    policy = strategy.kwargs["auto_wrap_policy"]
    backbone = build_backbone("torchvision/vit_b_16", weights=None)
    wrapped = [m for m in backbone.modules() if policy(m, recurse=False, nonwrapped_numel=0)]
    assert len(wrapped) == 12 and all(isinstance(m, EncoderBlock) for m in wrapped)


# --- every module under two-process CPU DDP ----------------------------------------------------
DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    from lightning.pytorch import Trainer, seed_everything
    from tests.test_scaling import EQUIV, EQUIV_MODEL, digits
    from tl_lightning import feature_cache
    from tl_lightning.callbacks import CSVPredictionWriter
    from tl_lightning.modules.feature_extraction import FeatureExtractionModule
    from tl_lightning.modules.finetune import FineTuneModule

    out = {out!r}
    quiet = dict(accelerator="cpu", devices=2, strategy="ddp", logger=False,
                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    def snapshot(model):
        return {{k: v.detach().clone() for k, v in model.state_dict().items()}}

    def dump(name, model, trainer, **extra):
        torch.save({{"state": snapshot(model), "step": trainer.global_step, **extra}},
                   f"{{out}}/{{name}}.rank{{trainer.global_rank}}.pt")

    # FineTune (BN layers training), checkpoint, then predict to one CSV
    seed_everything(0)
    model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None, train_groups=2)
    # ends with validation, whose first forward broadcasts rank 0's BN running stats (DDP)
    trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                      callbacks=[CSVPredictionWriter(f"{{out}}/preds.csv")], **quiet)
    dm = digits(batch_size=8, predict_dir=f"{{out}}/images")
    start = snapshot(model)
    trainer.fit(model, dm)
    trainer.save_checkpoint(f"{{out}}/finetune.ckpt")
    dump("finetune", model, trainer, start=start)
    trainer.predict(model, datamodule=dm, return_predictions=False)

    # FeatureExtraction with the cache (rank 0 fills it, rank 1 waits and reads) and without
    fills = []
    compute = feature_cache._compute
    feature_cache._compute = lambda *a, **k: (fills.append(1), compute(*a, **k))
    for cache in (True, False):
        seed_everything(0)
        model = FeatureExtractionModule(num_classes=10, backbone="resnet18", weights=None,
                                        cache_features=cache, cache_dir=f"{{out}}/cache")
        calls = []
        model.backbone.register_forward_hook(lambda *a: calls.append(1))
        trainer = Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, **quiet)
        start = snapshot(model)
        trainer.fit(model, digits(batch_size=8, image_size=16, split=(0.3, 0.2, 0.5)))
        dump(f"features_cache{{cache}}", model, trainer, start=start,
             backbone_calls=len(calls), fills=len(fills))

    # devices=2 with batch B/2 (the test runs devices=1 with batch B)
    seed_everything(0)
    model = FineTuneModule(**EQUIV_MODEL)
    trainer = Trainer(max_epochs=1, limit_train_batches=EQUIV["steps"],
                      limit_val_batches=EQUIV["val_batches"], **quiet)
    trainer.fit(model, digits(batch_size=EQUIV["batch"] // 2, image_size=EQUIV["image_size"], backbone="dann_cnn"))
    dump("equiv", model, trainer, val_acc=float(trainer.callback_metrics["val/acc"]))
    """
)


def digits(**kwargs) -> DigitsDataModule:
    """Real digits, small images, a random-init backbone's preprocessing, in-process loading."""
    defaults = dict(backbone="resnet18", weights=None, image_size=32, num_workers=0)
    return DigitsDataModule(**{**defaults, **kwargs})


class SameOrderDigits(DigitsDataModule):
    """Digits whose one-process train order is the global order DDP uses.

    Under DDP Lightning wraps the train sampler in a seeded, shuffling DistributedSamplerWrapper;
    with one replica the same wrapper yields that global order in one process.
    ``Trainer(strategy="ddp", devices=1)`` gets the same effect without code.
    """

    def train_dataloader(self):
        inner = super().train_dataloader().sampler
        sampler = DistributedSamplerWrapper(inner, num_replicas=1, rank=0, shuffle=True, seed=0)
        sampler.keyed = inner.keyed  # it yields the inner sampler's (epoch, index) keys
        return self._loader(self.train_set, "train", train=True, sampler=sampler)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One two-process CPU DDP run of every module (fits, checkpoint, predict); its outputs."""
    out = tmp_path_factory.mktemp("ddp")
    images = out / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):  # odd: DistributedSampler pads rank 1 with a repeat of the first image
        pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
    script = out / "ddp_all.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(out)))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=out, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def ranks(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same_state(r0: dict, r1: dict) -> None:
    assert r0["step"] == r1["step"] > 0
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key


def test_finetune_fits_under_ddp_with_identical_weights_on_both_ranks(ddp_run):
    r0, r1 = ranks(ddp_run, "finetune")
    assert_same_state(r0, r1)  # BN running stats too: validation's forward broadcast rank 0's
    assert r0["step"] == 3
    moved = {k for k, v in r0["state"].items() if not torch.equal(v, r0["start"][k])}
    assert {"head.1.weight", "backbone.body.layer4.1.conv2.weight"} <= moved
    assert "backbone.body.layer4.1.bn2.running_mean" in moved  # trainable BN in train mode
    assert not any(k.startswith("backbone.body.layer1.") for k in moved)  # frozen, BN in eval


@pytest.mark.parametrize("cache", [True, False])
def test_feature_extraction_fits_under_ddp_with_identical_weights(ddp_run, cache):
    r0, r1 = ranks(ddp_run, f"features_cache{cache}")
    assert_same_state(r0, r1)
    moved = {k for k, v in r0["state"].items() if not torch.equal(v, r0["start"][k])}
    assert moved == {"head.1.weight", "head.1.bias"}  # the frozen backbone, BN stats included
    if cache:  # rank 0 filled the cache (train, val), rank 1 waited and only read it
        assert (r0["fills"], r1["fills"]) == (2, 0)
        assert len(list((ddp_run / "cache").rglob("features.npy"))) == 2  # train, val
    else:  # no cache: every rank runs the backbone on its images
        assert (r0["fills"], r1["fills"]) == (2, 0)  # unchanged: nothing new was cached
        assert r0["backbone_calls"] >= 3 and r1["backbone_calls"] >= 3


def test_ddp_checkpoint_reloads_in_one_process_with_the_same_predictions(ddp_run):
    model = FineTuneModule.load_from_checkpoint(ddp_run / "finetune.ckpt", map_location="cpu")
    state = ranks(ddp_run, "finetune")[0]["state"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.eval()
    dataset = ImageFilesDataset(ddp_run / "images", digits().eval_transform())
    with open(ddp_run / "preds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # one file, each image exactly once, no per-rank leftovers
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in dataset.files)
    assert not list(ddp_run.glob("preds.rank*.csv"))
    by_file = {r["file"]: r for r in rows}
    with torch.no_grad():
        for i in range(len(dataset)):
            image, file = dataset[i]
            probs = model(image.unsqueeze(0)).softmax(dim=1)[0]
            assert by_file[file]["class"] == model.class_names[int(probs.argmax())]
            assert float(by_file[file]["probability"]) == pytest.approx(
                float(probs.max()), abs=1e-5
            )


def test_one_device_batch_b_matches_two_devices_batch_half_b(ddp_run, tmp_path):
    """Same seed, same global sample order, mean gradient over B, no BN/dropout: same model."""
    r0, r1 = ranks(ddp_run, "equiv")
    assert_same_state(r0, r1)
    seed_everything(0)
    model = FineTuneModule(**EQUIV_MODEL)
    dm = SameOrderDigits(
        backbone="dann_cnn",
        weights=None,
        image_size=EQUIV["image_size"],
        batch_size=EQUIV["batch"],
        num_workers=0,
    )
    trainer = quick_trainer(
        tmp_path, limit_train_batches=EQUIV["steps"], limit_val_batches=EQUIV["val_batches"]
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)
    assert trainer.global_step == r0["step"] == EQUIV["steps"]
    # training moved the weights far beyond the tolerance below, so agreement is not vacuous
    assert (model.head[1].weight - start["head.1.weight"]).abs().max() > 1e-3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, r0["state"][key], rtol=1e-4, atol=1e-5, msg=key)
    n_val = EQUIV["val_batches"] * EQUIV["batch"]
    assert abs(float(trainer.callback_metrics["val/acc"]) - r0["val_acc"]) <= 1 / n_val
