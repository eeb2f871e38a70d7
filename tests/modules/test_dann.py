"""DANNModule: gradient reversal, the paper's schedules, label hygiene, and fits (bf16, DDP, CLI)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, TensorDataset

import tl_lightning.backbones.dann_cnn  # noqa: F401  (registers dann_cnn)
from tests.helpers import print_config
from tl_lightning.data.digits_m import DigitsMSource
from tl_lightning.data.domain import DomainAdaptationDataModule
from tl_lightning.modules.dann import DANNAnnealing, DANNModule, dann_lr_factor
from tl_lightning.modules.grl import GradientReversal, grl_lambda

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    backbone="dann_cnn",
    weights=None,
    head_hidden_dims=[16],
    domain_hidden_dims=[16],
    domain_dropout=0.0,
    backbone_lr_scale=0.1,
    channels_last=False,
)


def tiny_pair(batch_size: int = 8, image_size: int = 16) -> DomainAdaptationDataModule:
    return DomainAdaptationDataModule(
        source=DigitsMSource(part="source", blend=False),
        target=DigitsMSource(part="target"),
        backbone="dann_cnn",
        weights=None,
        image_size=image_size,
        batch_size=batch_size,
    )


def quiet_trainer(**kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


# --- gradient reversal ---------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 2.5])
def test_grl_is_identity_forward_and_scales_gradient_by_minus_lambda(lam):
    x = torch.randn(4, 5, dtype=torch.double, requires_grad=True)
    grl = GradientReversal(lam)
    y = grl(x)
    assert torch.equal(y, x)
    incoming = torch.randn(4, 5, dtype=torch.double)
    y.backward(incoming)
    torch.testing.assert_close(x.grad, -lam * incoming)


def test_grl_lambda_is_settable_and_reverses_only_what_passes_through_it():
    w = torch.tensor(3.0, requires_grad=True)
    x = torch.tensor(2.0, requires_grad=True)
    grl = GradientReversal(1.0)
    grl.set_lambda(0.25)
    # d/dx [w * grl(x)] = -0.25 * w ; d/dw = grl(x) = x (forward is identity)
    (w * grl(x)).backward()
    assert x.grad.item() == pytest.approx(-0.25 * 3.0)
    assert w.grad.item() == pytest.approx(2.0)
    assert "0.25" in repr(grl)


# --- schedules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_lambda_and_lr_schedules_match_the_paper(p):
    assert grl_lambda(p, gamma=10) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
    assert dann_lr_factor(p, alpha=10, beta=0.75) * 0.01 == pytest.approx(
        0.01 / (1 + 10 * p) ** 0.75
    )
    assert grl_lambda(0.0) == 0.0 and dann_lr_factor(0.0) == 1.0


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_annealing_scheduler_gives_each_group_the_formula(p):
    total = 10
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.001}], momentum=0.9
    )
    sched = DANNAnnealing(opt, total_steps=total, alpha=10, beta=0.75)
    for _ in range(int(p * total)):
        opt.step()
        sched.step()
    expected = [lr0 / (1 + 10 * p) ** 0.75 for lr0 in (0.01, 0.001)]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected)


class RecordSchedules(Callback):
    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        self.rows.append((trainer.global_step, pl_module.grl.lambda_, lrs))


def test_fit_uses_global_step_over_estimated_stepping_batches():
    seed_everything(0)
    model = DANNModule(num_classes=10, **TINY)
    recorder = RecordSchedules()
    trainer = quiet_trainer(max_steps=4, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(model, tiny_pair())
    assert [row[0] for row in recorder.rows] == [0, 1, 2, 3]
    for step, lam, lrs in recorder.rows:
        p = step / 4  # estimated_stepping_batches == max_steps == 4
        assert lam == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
        factor = 1 / (1 + 10 * p) ** 0.75
        assert lrs["head"] == pytest.approx(0.01 * factor)
        assert lrs["domain_head"] == pytest.approx(0.01 * factor)
        assert lrs["backbone"] == pytest.approx(0.001 * factor)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert trainer.optimizers[0].defaults["momentum"] == 0.9


# --- target labels never train -------------------------------------------------------------------
def _fit_with_target_labels(
    target_labels: torch.Tensor, source_only: bool = False
) -> tuple[list[float], dict]:
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(32, 3, 16, 16, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    xt = torch.randn(32, 3, 16, 16, generator=gen) + 1.0
    loaders = {
        "source": DataLoader(TensorDataset(xs, ys), batch_size=8),
        "target": DataLoader(TensorDataset(xt, target_labels), batch_size=8),
    }
    seed_everything(0)
    model = DANNModule(num_classes=10, source_only=source_only, **TINY)

    class Losses(Callback):
        values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    losses = Losses()
    losses.values = []
    trainer = quiet_trainer(max_steps=4, callbacks=[losses])
    trainer.fit(model, train_dataloaders=CombinedLoader(loaders, mode="max_size_cycle"))
    return losses.values, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("source_only", [False, True])
def test_poisoned_target_labels_never_reach_the_loss(source_only):
    clean_losses, clean_state = _fit_with_target_labels(torch.randint(0, 10, (32,)), source_only)
    # 10**6 is out of range for 10 classes: cross-entropy would raise if these were ever used
    poisoned_losses, poisoned_state = _fit_with_target_labels(torch.full((32,), 10**6), source_only)
    assert len(clean_losses) == 4 and all(math.isfinite(v) for v in clean_losses)
    assert poisoned_losses == clean_losses
    for key, value in clean_state.items():
        assert torch.equal(value, poisoned_state[key]), key


def test_source_only_sends_no_domain_gradient_to_the_features():
    seed_everything(0)
    model = DANNModule(num_classes=10, source_only=True, **TINY)
    batch = {
        "source": (torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))),
        "target": torch.randn(4, 3, 16, 16),
    }
    model.training_step(batch, 0).backward()
    with_domain = {n: p.grad.clone() for n, p in model.backbone.named_parameters()}
    assert all(p.grad is not None for p in model.domain_head.parameters())  # the probe still learns
    model.zero_grad()
    model.loss(model(batch["source"][0]), batch["source"][1]).backward()
    for name, p in model.backbone.named_parameters():
        torch.testing.assert_close(p.grad, with_domain[name])


def test_dann_sends_reversed_domain_gradient_to_the_features():
    seed_everything(0)
    model = DANNModule(num_classes=10, source_only=False, **TINY)
    model.grl.set_lambda(1.0)
    feats = model.features(torch.randn(6, 3, 16, 16)).detach().requires_grad_(True)
    model.domain_head(model.grl(feats)).sum().backward()
    reversed_grad = feats.grad.clone()
    feats.grad = None
    model.domain_head(feats).sum().backward()
    torch.testing.assert_close(reversed_grad, -feats.grad)


def test_bad_batch_and_mismatched_sizes_have_clear_errors():
    model = DANNModule(num_classes=10, **TINY)
    with pytest.raises(ValueError, match="DomainAdaptationDataModule"):
        model.training_step((torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)), 0)
    batch = {
        "source": (torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)),
        "target": torch.randn(2, 3, 20, 20),
    }
    with pytest.raises(ValueError, match="image_size"):
        model.training_step(batch, 0)
    with pytest.raises(ValueError, match="dann_cnn has no pretrained weights"):
        DANNModule(num_classes=10, backbone="dann_cnn", weights="DEFAULT")


# --- fits ----------------------------------------------------------------------------------------
def test_fast_dev_run_logs_the_dann_metrics_and_selects_on_source():
    model = DANNModule(num_classes=10, **TINY)
    trainer = quiet_trainer(fast_dev_run=True)
    dm = tiny_pair()
    trainer.fit(model, dm)
    m = trainer.callback_metrics
    for key in (
        "train/class_loss",
        "train/domain_loss",
        "train/domain_acc",
        "train/grl_lambda",
        "train/lr",
        "val/source_acc",
        "val/target_acc",
        "val/acc_gap",
    ):
        assert key in m, key
    assert float(m["val/acc"]) == float(m["val/source_acc"])
    assert float(m["val/acc_gap"]) == pytest.approx(
        float(m["val/source_acc"]) - float(m["val/target_acc"])
    )
    assert 0.0 <= float(m["train/domain_acc"]) <= 1.0
    test = trainer.test(model, dm, verbose=False)[0]
    assert 0.0 <= test["test/acc"] <= 1.0


def test_checkpoint_rebuilds_without_other_arguments(tmp_path):
    model = DANNModule(num_classes=10, bottleneck_dim=8, **TINY)
    trainer = quiet_trainer(fast_dev_run=True)
    trainer.fit(model, tiny_pair())
    path = tmp_path / "dann.ckpt"
    trainer.save_checkpoint(path)
    loaded = DANNModule.load_from_checkpoint(path)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_fit_under_bf16_mixed():
    seed_everything(0)
    model = DANNModule(num_classes=10, **TINY)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=1, precision="bf16-mixed")
    trainer.fit(model, tiny_pair(batch_size=4))
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(float(trainer.callback_metrics["train/domain_loss"]))


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from lightning.pytorch import Trainer, seed_everything
    sys.path.insert(0, {repo!r})
    from tests.modules.test_dann import TINY, tiny_pair
    from tl_lightning.modules.dann import DANNModule

    seed_everything(0)
    model = DANNModule(num_classes=10, **TINY)
    start = {{k: v.clone() for k, v in model.state_dict().items()}}
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, limit_val_batches=1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, tiny_pair())
    torch.save({{"start": start, "end": model.state_dict(), "step": trainer.global_step}},
               f"{out}/rank{{trainer.global_rank}}.pt")
    """
)


def test_fit_under_two_process_cpu_ddp_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    for key, value in ranks[0]["end"].items():
        assert torch.equal(value, ranks[1]["end"][key]), key
    changed = [k for k, v in ranks[0]["end"].items() if not torch.equal(v, ranks[0]["start"][k])]
    assert any(k.startswith("backbone.") for k in changed) and any(
        k.startswith("domain_head.") for k in changed
    )


# --- configs under the CLI -----------------------------------------------------------------------
OFFLINE_CONFIGS = [
    "configs/dann/digits_to_digitsm.yaml",
    "configs/dann/digits_to_digitsm_source_only.yaml",
]


@pytest.mark.parametrize("config", OFFLINE_CONFIGS)
def test_offline_configs_fit_under_the_cli(config, tmp_path, monkeypatch):
    from tl_lightning.cli import run_cli

    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(REPO / config),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--data.init_args.batch_size=8",
        ]
    )
    assert isinstance(cli.model, DANNModule)
    assert cli.model.hparams.source_only == ("source_only" in config)
    assert cli.datamodule.hparams.backbone == cli.model.hparams.backbone == "dann_cnn"
    sides = cli.datamodule.sources
    assert isinstance(sides["source"], DigitsMSource) and isinstance(sides["target"], DigitsMSource)
    assert (sides["source"].blend, sides["target"].blend) == (False, True)
    assert cli.datamodule.hparams.augment == "basic" and cli.datamodule.hparams.target_augment is None
    assert "val/source_acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("config", OFFLINE_CONFIGS)
def test_offline_configs_print_config_round_trips(config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = print_config(["fit", "--config", str(REPO / config)], capsys)
    (tmp_path / "printed.yaml").write_text(first)
    assert print_config(["fit", "--config", str(tmp_path / "printed.yaml")], capsys) == first
    printed = yaml.safe_load(first)
    assert printed["model"]["class_path"].endswith("DANNModule")


def test_internet_config_names_the_pair_with_one_label_space():
    cfg = yaml.safe_load((REPO / "configs/dann/catsdogs_to_cifar10.yaml").read_text())
    data = cfg["data"]["init_args"]
    assert cfg["model"]["class_path"].endswith("DANNModule")
    assert data["source"]["class_path"].endswith("CatsDogsSource")
    assert data["target"]["class_path"].endswith("CIFAR10Source")
    assert data["target"]["init_args"]["classes"] == ["cat", "dog"]


@pytest.mark.parametrize(("bn", "stats_move", "affine_trains"), [
    ("eval", False, False), ("stats", True, False), ("affine", False, True), ("train", True, True),
])  # fmt: skip
def test_frozen_groups_follow_the_bn_policy_vocabulary(bn, stats_move, affine_trains):
    model = DANNModule(
        num_classes=3, backbone="resnet18", weights=None, freeze_groups=["stem"], bn=bn,
        channels_last=False,
    )  # fmt: skip
    stem_bn = model.backbone.body.bn1  # resnet18's stem BatchNorm
    before = stem_bn.running_mean.clone()
    model.train()
    model.backbone(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert (not torch.equal(before, stem_bn.running_mean)) == stats_move
    assert stem_bn.weight.requires_grad == affine_trains
    assert not model.backbone.body.conv1.weight.requires_grad  # the stem stays frozen


def test_unknown_bn_policy_names_the_vocabulary():
    with pytest.raises(ValueError, match="unknown bn 'frozen'; valid: eval, train, affine, stats"):
        DANNModule(num_classes=3, backbone="resnet18", weights=None, bn="frozen")
