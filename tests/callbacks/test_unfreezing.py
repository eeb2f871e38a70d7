"""GradualUnfreezing (tiny random-init resnet18 on 16 px noise): frozen means frozen, resume is exact, schedulers and DDP survive unfreezing."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.cli import run_cli
from tl_lightning.modules.base import ClassifierModule
from tl_lightning.modules.finetune import FineTuneModule
from tl_lightning.optim import OneCycleLR, WarmupCosine

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "digits"


def loaders(n: int = 32, batch: int = 8) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=batch), DataLoader(data, batch_size=batch)


def tiny_model(
    lr: float = 1e-2, optimizer=torch.optim.Adam, scheduler=None, **kw
) -> FineTuneModule:
    seed_everything(0)
    return FineTuneModule(
        num_classes=4,
        backbone="resnet18",
        weights=None,
        optimizer=functools.partial(optimizer, lr=lr),
        lr_scheduler=scheduler,
        channels_last=False,
        **kw,
    )


def trainer(max_epochs: int, callbacks: list, tmp_path: Path, **kw) -> Trainer:
    kw = {"limit_train_batches": 2, "limit_val_batches": 1, **kw}
    return Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class EpochSnapshots(Callback):
    """Weights at the start of every training epoch and at the end of fit."""

    def __init__(self):
        self.at: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, dict[str, float]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.at[trainer.current_epoch] = snapshot(pl_module)
        self.lrs[trainer.current_epoch] = {
            g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups
        }

    def on_train_end(self, trainer, pl_module):
        self.at["end"] = snapshot(pl_module)


def changed(a: dict, b: dict, prefix: str) -> bool:
    keys = [
        k for k in a if k.startswith(prefix) and a[k].is_floating_point() and "running" not in k
    ]
    assert keys, prefix
    return any(not torch.equal(a[k], b[k]) for k in keys)


def test_every_group_is_in_the_optimizer_from_the_start_and_frozen_ones_do_not_move(tmp_path):
    model = tiny_model()
    snaps = EpochSnapshots()
    unfreeze = GradualUnfreezing(milestones={1: ["layer4"], 2: [".*"]}, lr_ratio=0.1)
    trainer(3, [unfreeze, snaps], tmp_path).fit(model, *loaders())
    names = [g["name"] for g in model.trainer.optimizers[0].param_groups]
    assert names == [
        "head",
        *(f"backbone.{n}" for n in ("layer4", "layer3", "layer2", "layer1", "stem")),
    ]
    s0, s1, s2, end = snaps.at[0], snaps.at[1], snaps.at[2], snaps.at["end"]
    # epoch 0: head only
    assert changed(s0, s1, "head.")
    assert not any(
        changed(s0, s1, f"backbone.body.{p}") for p in ("conv1", "layer1", "layer3", "layer4")
    )
    assert snaps.lrs[0]["backbone.layer4"] == 0.0 and snaps.lrs[0]["head"] == pytest.approx(1e-2)
    # epoch 1: layer4 joins at a tenth of the head LR, the rest stays put
    assert changed(s1, s2, "backbone.body.layer4.")
    assert not changed(s1, s2, "backbone.body.layer3.") and not changed(
        s1, s2, "backbone.body.conv1"
    )
    assert snaps.lrs[1]["backbone.layer4"] == pytest.approx(1e-3)
    assert snaps.lrs[1]["backbone.layer3"] == 0.0
    # epoch 2: everything
    assert changed(s2, end, "backbone.body.conv1") and changed(s2, end, "backbone.body.layer1.")


class GradProbe(Callback):
    """Checks each step that a param moved by exactly ``lr * grad`` (plain SGD)."""

    def __init__(self, names: list[str]):
        self.names, self.seen = names, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.before = {
            n: (
                params[n].detach().clone(),
                None if params[n].grad is None else params[n].grad.clone(),
                lr_of[id(params[n])],
            )
            for n in self.names
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for n, (before, grad, lr) in self.before.items():
            delta = params[n].detach() - before
            expected = torch.zeros_like(before) if grad is None else -lr * grad
            torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-7)
            self.seen.setdefault(n, set()).add(round(lr, 12))


def test_unfrozen_group_trains_at_its_own_lr(tmp_path):
    model = tiny_model(lr=0.1, optimizer=torch.optim.SGD)
    probe = GradProbe(
        [
            "head.1.weight",
            "backbone.body.layer4.1.conv2.weight",
            "backbone.body.layer1.0.conv1.weight",
        ]
    )
    unfreeze = GradualUnfreezing(milestones={1: ["layer4"]}, lr_ratio=0.25, lr_decay=0.5)
    trainer(2, [unfreeze, probe], tmp_path).fit(model, *loaders())
    assert probe.seen["head.1.weight"] == {0.1}
    assert probe.seen["backbone.body.layer4.1.conv2.weight"] == {0.0, 0.025}
    assert probe.seen["backbone.body.layer1.0.conv1.weight"] == {0.0}


def test_frozen_backbone_builds_no_autograd_graph(tmp_path):
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.backbone(batch[0]).requires_grad)

    trainer(2, [GradualUnfreezing(unfreeze_at_epoch=1), Probe()], tmp_path).fit(
        tiny_model(), *loaders()
    )
    assert seen == [False, False, True, True]


@pytest.mark.parametrize("bn", ["eval", "train", "affine", "stats"])
def test_frozen_batchnorm_statistics(tmp_path, bn):
    model = tiny_model()
    snaps = EpochSnapshots()
    trainer(1, [GradualUnfreezing(unfreeze_at_epoch=5, bn=bn), snaps], tmp_path).fit(
        model, *loaders()
    )
    stats = [k for k in snaps.at[0] if k.startswith("backbone.") and "running_mean" in k]
    moved = any(not torch.equal(snaps.at[0][k], snaps.at["end"][k]) for k in stats)
    assert moved == (bn in ("train", "stats"))
    affine = changed(snaps.at[0], snaps.at["end"], "backbone.body.bn1.")
    assert affine == (bn in ("train", "affine"))


SCHEDULERS = {
    "onecycle": functools.partial(OneCycleLR),
    "cosine": functools.partial(WarmupCosine, warmup_fraction=0.2, min_ratio=0.1),
    "plateau": functools.partial(
        torch.optim.lr_scheduler.ReduceLROnPlateau,
        patience=0,
        factor=0.5,
        min_lr=1e-6,
        threshold=10.0,
    ),
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_schedulers_follow_groups_through_phase_changes(tmp_path, kind):
    model = tiny_model(scheduler=SCHEDULERS[kind])
    snaps = EpochSnapshots()
    unfreeze = GradualUnfreezing(
        milestones={1: ["layer4"], 2: ["layer3"]}, lr_ratio=0.1, lr_decay=0.5
    )
    trainer(4, [unfreeze, snaps], tmp_path).fit(model, *loaders())
    opt = model.trainer.optimizers[0]
    sched = model.trainer.lr_scheduler_configs[0].scheduler
    idx = {g["name"]: i for i, g in enumerate(opt.param_groups)}
    lr = {n: opt.param_groups[i]["lr"] for n, i in idx.items()}
    assert lr["backbone.layer4"] == pytest.approx(0.1 * lr["head"], rel=1e-6) and lr["head"] > 0
    assert lr["backbone.layer3"] == pytest.approx(0.05 * lr["head"], rel=1e-6)
    assert lr["backbone.layer2"] == 0.0 and lr["backbone.stem"] == 0.0
    for e in (1, 2, 3):  # the ratio holds from the epoch a group unfreezes on
        assert snaps.lrs[e]["backbone.layer4"] == pytest.approx(
            0.1 * snaps.lrs[e]["head"], rel=1e-6
        )
    assert snaps.lrs[1]["backbone.layer3"] == 0.0
    if kind == "onecycle":
        assert opt.param_groups[idx["backbone.layer4"]]["max_lr"] == pytest.approx(1e-3)
        assert opt.param_groups[idx["backbone.layer2"]]["max_lr"] == 0.0
    elif kind == "cosine":
        assert sched.base_lrs[idx["backbone.layer3"]] == pytest.approx(5e-4)
        assert sched.base_lrs[idx["backbone.stem"]] == 0.0
    else:
        assert lr["head"] < 1e-2  # the plateau scheduler did reduce, and the groups followed
        assert (
            sched.min_lrs[idx["backbone.layer4"]] == 1e-6
            and sched.min_lrs[idx["backbone.stem"]] == 0.0
        )


def resume_setup(kind: str):
    if kind == "restart_onecycle":  # the fastai recipe: one cycle per phase
        model = tiny_model(scheduler=functools.partial(OneCycleLR))
        cb = GradualUnfreezing(
            unfreeze_at_epoch=1,
            lr_ratio=0.1,
            lr_decay=0.6,
            unfrozen_lr_scale=0.5,
            restart_schedule=True,
        )
    else:
        model = tiny_model(scheduler=functools.partial(WarmupCosine))
        cb = GradualUnfreezing(milestones={1: ["layer4"], 3: [".*"]}, lr_ratio=0.1, warmup_steps=3)
    return model, cb


@pytest.mark.parametrize("kind", ["cosine_warmup", "restart_onecycle"])
def test_resume_at_a_boundary_and_mid_phase_matches_an_uninterrupted_run(tmp_path, kind):
    model, cb = resume_setup(kind)
    ckpts = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}"
    )
    trainer(4, [cb, ckpts], tmp_path, limit_train_batches=3).fit(model, *loaders())
    reference = snapshot(model)
    # epoch=0.ckpt: resume at the milestone epoch 1; epoch=1.ckpt: resume mid-phase (in warm-up)
    for done in (0, 1):
        resumed, cb2 = resume_setup(kind)
        trainer(4, [cb2], tmp_path, limit_train_batches=3, enable_checkpointing=False).fit(
            resumed, *loaders(), ckpt_path=tmp_path / "ckpt" / f"epoch={done}.ckpt"
        )
        final = snapshot(resumed)
        for k, v in reference.items():
            torch.testing.assert_close(
                final[k], v, rtol=1e-5, atol=1e-6, msg=f"{k} after resuming at {done + 1}"
            )


def test_ddp_safe_mode_matches_plain_mode_on_one_process(tmp_path):
    finals = []
    for safe in (False, True):
        model = tiny_model()
        trainer(3, [GradualUnfreezing(every_n_epochs=1, ddp_safe=safe)], tmp_path).fit(
            model, *loaders()
        )
        finals.append(snapshot(model))
    for k, v in finals[0].items():
        torch.testing.assert_close(finals[1][k], v, msg=k)


DDP_SCRIPT = """
import functools, sys, torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.modules.finetune import FineTuneModule

seed_everything(0)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 4, (32,), generator=g))
model = FineTuneModule(num_classes=4, backbone="resnet18", weights=None, channels_last=False,
                       optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
initial = {k: v.clone() for k, v in model.state_dict().items()}
trainer = Trainer(max_epochs=3, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  limit_val_batches=0, callbacks=[GradualUnfreezing(milestones={1: ["layer4"], 2: ["layer3"]})])
trainer.fit(model, DataLoader(data, batch_size=4))
torch.save({"final": model.state_dict(), "initial": initial}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


def test_two_process_ddp_ranks_hold_identical_weights_after_unfreezing(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert changed(r0["initial"], r0["final"], "backbone.body.layer4.")
    assert changed(r0["initial"], r0["final"], "backbone.body.layer3.")
    assert not changed(r0["initial"], r0["final"], "backbone.body.layer2.")
    params = [k for k in r0["final"] if "running" not in k and "num_batches" not in k]
    for k in params:  # BN running stats are per-rank by design (no SyncBatchNorm); weights are not
        torch.testing.assert_close(r1["final"][k], r0["final"][k], rtol=0, atol=0, msg=k)


def test_rejects_a_module_that_merges_groups(tmp_path):
    seed_everything(0)
    model = ClassifierModule(num_classes=4, backbone="resnet18", weights=None, channels_last=False)
    with pytest.raises(ValueError, match="one optimizer param group per backbone layer group"):
        trainer(1, [GradualUnfreezing()], tmp_path).fit(model, *loaders())


def test_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="only one of"):
        GradualUnfreezing(unfreeze_at_epoch=1, every_n_epochs=2)
    with pytest.raises(ValueError, match="lr_decay"):
        GradualUnfreezing(lr_decay=0)


@pytest.mark.parametrize("config", ["fine_tune_fastai.yaml", "gradual_seeds.yaml"])
def test_recipe_configs_run_and_round_trip(tmp_path, monkeypatch, capsys, config):
    monkeypatch.chdir(tmp_path)
    path = str(CONFIGS / config)
    common = ["--trainer.logger=false", "--data.init_args.image_size=32"]
    run_cli(["fit", "--config", path, "--trainer.fast_dev_run=true", *common])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", path, "--print_config"])
    printed = capsys.readouterr().out
    assert "GradualUnfreezing" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", "printed.yaml", "--print_config"])
    reprinted = capsys.readouterr()
    assert reprinted.out == printed, reprinted.err[-2000:]
    if "fastai" in config:  # a real (short) run through its milestone: the head epoch, then all
        cli = run_cli(
            [
                "fit",
                "--config",
                path,
                *common,
                "--trainer.max_epochs=2",
                "--trainer.limit_train_batches=3",
                "--trainer.limit_val_batches=1",
            ]
        )
        groups = cli.trainer.optimizers[0].param_groups
        n = len(cli.model.backbone.group_names())
        assert len(groups) == n + 1 and all(g["max_lr"] > 0 for g in groups)
        head, stem = groups[0]["max_lr"], groups[-1]["max_lr"]
        assert head == pytest.approx(0.001) and stem == pytest.approx(head / 100, rel=1e-3)


def test_lr_find_subcommand_with_the_callback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "lr_find",
            "--config",
            str(CONFIGS / "gradual_seeds.yaml"),
            "--trainer.logger=false",
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=16",
            "--num_training=20",
            "--trainer.limit_val_batches=1",
        ]
    )
    out = capsys.readouterr().out
    assert "suggested learning rate" in out
    assert (tmp_path / "lr_find.png").exists()
