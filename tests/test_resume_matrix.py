"""Resume equality: a run SIGKILLed mid-epoch and resumed with ``--ckpt_path last`` ends with the
weights of the uninterrupted run (max |w diff| <= 1e-6), on the paths shipped configs take.

Each case: an uninterrupted fit (in this process), the same fit in a child process killed by
SIGKILL at a mid-epoch step (``tests.test_faults.KillAtStep``), then ``--ckpt_path last``.
Tiny nets, 16 px digits, 2 epochs of a few steps.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tl_lightning.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6

BASE = """
seed_everything: 0
model:
  class_path: tl_lightning.modules.finetune.FineTuneModule
  init_args:
    backbone: conv4
    weights: null
    head_dropout: 0.3
    optimizer:
      class_path: torch.optim.AdamW
      init_args: {lr: 0.003}
data:
  class_path: tl_lightning.data.DigitsDataModule
  init_args:
    image_size: 16
    batch_size: 32
    augment: basic
    split: [0.1, 0.05, 0.85]   # 179 train images: 5 steps per epoch
trainer:
  max_epochs: 2
  accelerator: cpu
  devices: 1
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
checkpoint:
  every_n_train_steps: 2
"""

SCHEDULERS = {
    "none": [],
    "step": ["--model.init_args.lr_scheduler=torch.optim.lr_scheduler.StepLR",
             "--model.init_args.lr_scheduler.step_size=1", "--model.init_args.lr_scheduler.gamma=0.5"],
    "onecycle": ["--model.init_args.lr_scheduler=tl_lightning.optim.OneCycleLR"],
    "warmup_cosine": ["--model.init_args.lr_scheduler=tl_lightning.optim.WarmupCosine",
                      "--model.init_args.lr_scheduler.warmup_fraction=0.2"],
    "plateau": ["--model.init_args.lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
                "--model.init_args.lr_scheduler.patience=0"],
}  # fmt: skip


def max_weight_diff(a: Path, b: Path) -> float:
    wa = torch.load(a, map_location="cpu", weights_only=True)["state_dict"]
    wb = torch.load(b, map_location="cpu", weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())


def _fit_then_sigkill(args: list[str]) -> None:
    run_cli(args)  # KillAtStep SIGKILLs this process mid-epoch
    os._exit(0)  # not reached when the kill works


def kill_resume_compare(
    tmp_path: Path, config: str, args: list[str], kill_step: int, uninterrupted: tuple = ()
) -> tuple:
    """Uninterrupted fit, killed child, resume; returns (max |w diff|, resumed cli, killed ckpt).

    The killed run is a forked child (no second import of torch), SIGKILLed by
    ``tests.test_faults.KillAtStep``. ``uninterrupted`` adds flags to the uninterrupted run only.
    """
    (tmp_path / "case.yaml").write_text(config)
    common = ["--config", "case.yaml", *args]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one float reduction order in every run
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        run_cli(["fit", *common, *uninterrupted, "--trainer.logger=false",
                 "--checkpoint.dirpath=uninterrupted"])  # fmt: skip
        killer = ["--trainer.callbacks+=tests.test_faults.KillAtStep",
                  f"--trainer.callbacks.step={kill_step}"]  # fmt: skip
        child = multiprocessing.get_context("fork").Process(
            target=_fit_then_sigkill, args=(["fit", *common, *killer],)
        )
        child.start()
        child.join(timeout=300)
        assert child.exitcode == -signal.SIGKILL, child.exitcode
        last = next((tmp_path / "runs").glob("*/version_0/checkpoints/last.ckpt"))
        at_kill = torch.load(last, map_location="cpu", weights_only=True)
        cli = run_cli(["fit", *common, "--ckpt_path", "last"])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return max_weight_diff(tmp_path / "uninterrupted/last.ckpt", last), cli, at_kill


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_finetune_resume_matches_uninterrupted(scheduler, workers, tmp_path):
    args = [*SCHEDULERS[scheduler], f"--data.init_args.num_workers={workers}"]
    diff, cli, at_kill = kill_resume_compare(tmp_path, BASE, args, kill_step=3)
    assert at_kill["global_step"] == 2 and at_kill["epoch"] == 0  # killed mid-epoch 0
    assert cli.trainer.global_step == 10
    assert cli.trainer.logger.version == 0  # not the folder name 'version_0' (v_num=on_0)
    assert diff <= TOL, f"{scheduler}, {workers} workers: max |w diff| {diff:.3g}"


class RecordLR(Callback):
    """Record the first param group's LR before every optimizer step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[-1]["lr"]


def test_extending_a_one_cycle_run_continues_on_the_longer_cycle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ["--config", str(ROOT / "configs/digits/fine_tune_fastai.yaml"),
            "--model.init_args.backbone=conv4", "--model.init_args.weights=null",
            "--data.init_args.image_size=16", "--data.init_args.batch_size=32",
            "--data.init_args.split=[0.1, 0.05, 0.85]", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.num_sanity_val_steps=0", "--trainer.logger.init_args.save_dir=runs"]  # fmt: skip
    run_cli(["fit", *tiny, "--trainer.max_epochs=2"])  # 1 frozen + 1 unfrozen epoch, 5 steps each
    cli = run_cli(["fit", *tiny, "--trainer.max_epochs=4", "--ckpt_path", "last",
                   "--trainer.callbacks+=tests.test_resume_matrix.RecordLR"])  # fmt: skip
    recorder = next(c for c in cli.trainer.callbacks if isinstance(c, RecordLR))
    assert cli.trainer.global_step == 20
    # the unfrozen phase (epochs 1-3) is one cycle of 15 steps; 5 of them were taken before:
    # the extended run's LRs are torch's OneCycleLR of 15 steps from its 6th step on
    group = cli.trainer.optimizers[0].param_groups[-1]
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=group["max_lr"])
    reference = torch.optim.lr_scheduler.OneCycleLR(
        reference_opt, max_lr=group["max_lr"], total_steps=15, pct_start=0.3, div_factor=5.0
    )
    expected = []
    for _ in range(15):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference_opt.step()
        reference.step()
    got = [recorder.lrs[step] for step in range(10, 20)]
    assert got == pytest.approx(expected[5:], rel=1e-6)


def test_extended_warmup_cosine_continues_on_the_curve_of_the_new_length():
    from tl_lightning.optim import WarmupCosine

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    short_opt = opt()
    short = WarmupCosine(short_opt, total_steps=10, warmup_fraction=0.2)
    for _ in range(6):
        short_opt.step()
        short.step()
    longer_opt = opt()
    longer_opt.load_state_dict(short_opt.state_dict())  # Lightning restores optimizers first
    longer = WarmupCosine(longer_opt, total_steps=20, warmup_fraction=0.2)
    longer.load_state_dict(short.state_dict())
    # step 6 of 20 with 4 warm-up steps: cosine progress (6 - 4) / (20 - 4)
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 16))
    assert longer_opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    assert longer.total_steps == 20 and longer.last_epoch == 6


# --- a batch where every image failed ---------------------------------------------------------
class _SeenBatches(LightningModule):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.w, self.seen = torch.nn.Parameter(torch.zeros(1)), seen

    def training_step(self, batch, batch_idx):
        self.seen.append((self.trainer.global_step, batch.flatten().tolist()))
        return (self.w * batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SaveAt(Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize(
    ("failed_batch", "save_step"),
    [(0, 1), (1, 1), (1, 3), (9, 8), (9, 9)],  # (9, 9): saved after the last good batch of epoch 0
)
def test_resume_around_a_batch_where_every_image_failed(failed_batch, save_step, tmp_path):
    from tl_lightning.data.base import ResumableSkipFailedDataLoader
    from tl_lightning.data.decode import skip_failed_collate
    from tl_lightning.data.resumable_sampler import ResumableRandomSampler

    order = ResumableRandomSampler(20, seed=0).order()  # epoch 0: 10 batches of 2
    bad = set(order[2 * failed_batch : 2 * failed_batch + 2])

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return None if i in bad else torch.tensor([float(i)])

    def loader():
        return ResumableSkipFailedDataLoader(Data(), batch_size=2, collate_fn=skip_failed_collate,
                                             sampler=ResumableRandomSampler(20, seed=0))  # fmt: skip

    quiet = dict(max_epochs=2, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    full, resumed = [], []
    Trainer(callbacks=[_SaveAt(save_step, tmp_path / "mid.ckpt")], **quiet).fit(
        _SeenBatches(full), loader()
    )
    Trainer(**quiet).fit(_SeenBatches(resumed), loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert len(full) == 19  # one batch of epoch 0 dropped, none of epoch 1
    assert resumed == [(step, batch) for step, batch in full if step >= save_step]


# --- limit_train_batches: a checkpoint after an epoch's last batch ----------------------------
class _SeenBatchesResuming(_SeenBatches):
    def on_train_start(self) -> None:  # what every tl-lightning module does
        from tl_lightning.resume import restore_train_loader_state

        restore_train_loader_state(self.trainer)

    def validation_step(self, batch, batch_idx) -> None:
        pass


class _SaveAtValidationEnd(Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class _SaveAtEpochEnd(Callback):
    def __init__(self, epoch: int, path: Path) -> None:
        self.epoch, self.path = epoch, path

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("saved", ["last batch", "validation end", "epoch end"])
@pytest.mark.parametrize("length", ["max_epochs", "max_steps"])
def test_resume_after_an_epoch_cut_by_limit_train_batches(length, saved, workers, tmp_path):
    # 10 batches of 2 an epoch, cut to 4: a checkpoint after epoch 0's 4th batch must resume at
    # batch 0 of epoch 1 (the loader's own count, 4 of 10, looks mid-epoch); before the fix the
    # resumed run skipped the first 4 batches of epoch 1 (DANN showed 0.0016)
    from tl_lightning.data.base import ResumableSkipFailedDataLoader
    from tl_lightning.data.decode import skip_failed_collate
    from tl_lightning.data.resumable_sampler import ResumableRandomSampler

    def loader():
        return ResumableSkipFailedDataLoader(
            [torch.tensor([float(i)]) for i in range(20)], batch_size=2,
            collate_fn=skip_failed_collate, sampler=ResumableRandomSampler(20, seed=0),
            num_workers=workers, persistent_workers=workers > 0,
        )  # fmt: skip

    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, limit_train_batches=4, limit_val_batches=1,
                 num_sanity_val_steps=0)  # fmt: skip
    # 3 epochs of 4 steps, counted in epochs or in steps (then the fit loop always "restarts")
    quiet.update({"max_epochs": 3} if length == "max_epochs" else {"max_steps": 12, "max_epochs": -1})
    end = tmp_path / "end.ckpt"
    save = {"last batch": _SaveAt(4, end), "validation end": _SaveAtValidationEnd(4, end),
            "epoch end": _SaveAtEpochEnd(0, end)}[saved]  # fmt: skip
    val = [torch.zeros(1)]
    full, resumed = [], []
    Trainer(callbacks=[save], **quiet).fit(_SeenBatchesResuming(full), loader(), val)
    Trainer(**quiet).fit(_SeenBatchesResuming(resumed), loader(), val, ckpt_path=end)
    sampler = ResumableRandomSampler(20, seed=0)
    expected = []
    for epoch in (1, 2):  # the first 4 batches of each later epoch's order, computed here
        sampler.set_epoch(epoch)
        order = sampler.order()
        expected += [[float(i) for i in order[2 * b : 2 * b + 2]] for b in range(4)]
    assert [batch for _, batch in resumed] == expected
    assert resumed == [(step, batch) for step, batch in full if step >= 4]


# --- augmentation: a function of (seed, epoch, sample index) --------------------------------
def test_random_augmentation_gives_the_same_weights_for_0_and_2_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "case.yaml").write_text(BASE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for workers in (0, 2):
            run_cli(["fit", "--config", "case.yaml", "--trainer.logger=false",
                     "--data.init_args.augment=strong", f"--data.init_args.num_workers={workers}",
                     f"--checkpoint.dirpath=w{workers}"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert max_weight_diff(tmp_path / "w0/last.ckpt", tmp_path / "w2/last.ckpt") == 0.0


def test_each_sample_is_augmented_from_seed_epoch_and_index_alone():
    from tl_lightning.data import DigitsDataModule

    def batches(workers: int, epoch: int) -> list[torch.Tensor]:
        dm = DigitsDataModule(backbone="conv4", weights=None, image_size=16, batch_size=16,
                              augment="strong", num_workers=workers, split=[0.1, 0.05, 0.85])  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        torch.manual_seed(workers)  # the global stream must not matter
        return [x for x, _ in loader]

    zero, two = batches(0, 1), batches(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(zero, two, strict=True))
    other_epoch = batches(0, 2)
    assert not torch.equal(torch.cat(zero).sum(0), torch.cat(other_epoch).sum(0))


MIX = ["--data.init_args.mixup_alpha=0.4", "--data.init_args.cutmix_alpha=1.0"]


def test_each_mixup_cutmix_draw_is_a_function_of_seed_epoch_and_batch_index():
    from tl_lightning.data import DigitsDataModule

    def batches(workers: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        dm = DigitsDataModule(backbone="conv4", weights=None, image_size=16, batch_size=16,
                              mixup_alpha=0.4, cutmix_alpha=1.0, num_workers=workers,
                              split=[0.1, 0.05, 0.85])  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.load_state_dict({"epoch": 1, "batches": skip})  # epoch 1, resumed after `skip`
        torch.manual_seed(workers + skip)  # neither the global stream nor the worker's matters
        return list(loader)

    zero, two, resumed = batches(0), batches(2), batches(2, skip=3)
    assert len(zero) == 11 and zero[0][1].shape == (16, 10)  # soft targets: mixed
    for a, b in zip(zero, two, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(zero[3:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(zero[0][1], zero[1][1])  # each batch its own draw


def test_mixup_cutmix_weights_are_the_same_for_0_workers_and_2_workers_killed_and_resumed(tmp_path):
    # one comparison for both promises: the uninterrupted run loads in the main process, the
    # killed and resumed one with 2 workers (a difference in either would show)
    args = [*MIX, "--data.init_args.num_workers=2"]
    diff, _, at_kill = kill_resume_compare(
        tmp_path, BASE, args, kill_step=3, uninterrupted=["--data.init_args.num_workers=0"]
    )
    assert at_kill["global_step"] == 2 and at_kill["epoch"] == 0
    assert diff <= TOL, f"MixUp/CutMix, 0 workers vs 2 killed+resumed: max |w diff| {diff:.3g}"


# --- DDP: each rank restores its own random state ---------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_restores_its_own_rng_state(rank):
    from types import SimpleNamespace

    from tl_lightning.callbacks.rng_state import RNGStateCheckpoint, _collect_rng_states

    streams, expected = [], []
    for seed in (10, 11):  # what rank 0 and rank 1 held at the save
        torch.manual_seed(seed)
        streams.append(_collect_rng_states())
        expected.append(torch.rand(3))
    callback = RNGStateCheckpoint()
    callback.load_state_dict({"rng": streams[0], "rng_per_rank": streams})
    torch.manual_seed(0)
    callback.on_train_start(SimpleNamespace(world_size=2, global_rank=rank), None)
    assert torch.equal(torch.rand(3), expected[rank])
    # a checkpoint from another world size (or without per-rank states): rank 0's stream
    callback.load_state_dict({"rng": streams[0]})
    callback.on_train_start(SimpleNamespace(world_size=2, global_rank=rank), None)
    assert torch.equal(torch.rand(3), expected[0])


# --- each module, and each shipped config on offline data -------------------------------------
TINY = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
        "--checkpoint.every_n_train_steps=2"]  # fmt: skip
RESNET16 = ["--model.init_args.backbone=resnet18", "--model.init_args.weights=null",
            "--data.init_args.image_size=16"]  # fmt: skip
DANN = ["--trainer.max_epochs=-1", "--trainer.max_steps=8", "--trainer.val_check_interval=4",
        "--trainer.limit_train_batches=null", "--data.init_args.batch_size=32"]  # fmt: skip
CONV4 = ["--model.init_args.backbone=conv4", "--model.init_args.weights=null",
         "--data.init_args.image_size=16"]  # fmt: skip
# config -> (overrides, kill step); saves every 2 steps, so the resume point is the last even step
CONFIG_CASES = {
    # GradualUnfreezing (unfreeze at epoch 1, bn: stats, one-cycle per phase): 4 steps per epoch;
    # a kill at step 3 resumes inside the cached frozen phase, at step 7 inside the unfrozen one
    "digits/fine_tune_fastai (GradualUnfreezing, killed in the cached frozen phase)": (
        "digits/fine_tune_fastai.yaml", CONV4, 3),
    "digits/fine_tune_fastai (GradualUnfreezing, killed in the unfrozen phase, in warm-up)": (
        "digits/fine_tune_fastai.yaml", [*CONV4, "--trainer.callbacks.warmup_steps=3"], 7),
    # frozen_head: probe: the head is the L-BFGS probe's at step 0; the resumed run must not refit
    "digits/fine_tune_fastai (GradualUnfreezing, frozen_head probe, killed in the frozen phase)": (
        "digits/fine_tune_fastai.yaml", [*CONV4, "--trainer.callbacks.frozen_head=probe"], 3),
    "quickstart (FeatureExtraction, cached)": ("quickstart.yaml", [*RESNET16], 3),
    "quickstart (FeatureExtraction, uncached)": (
        "quickstart.yaml", [*RESNET16, "--model.init_args.cache_features=false"], 3),
    "digits/finetune": ("digits/finetune.yaml", [*RESNET16], 3),
    "digits/gradual_seeds": ("digits/gradual_seeds.yaml",
                             ["--model.init_args.weights=null", "--data.init_args.image_size=32"], 3),
    "dann/digits_to_digitsm (DANN)": ("dann/digits_to_digitsm.yaml", DANN, 5),
    "dann/digits_to_digitsm_source_only": ("dann/digits_to_digitsm_source_only.yaml", DANN, 5),
    "protonet/digits_5way (ProtoNet)": (
        "protonet/digits_5way.yaml",
        ["--data.init_args.train_episodes=4", "--data.init_args.val_episodes=1"], 3),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_shipped_config_resumes_to_the_uninterrupted_weights(case, tmp_path, monkeypatch):
    config, overrides, kill_step = CONFIG_CASES[case]
    monkeypatch.setenv("TL_LIGHTNING_CACHE", str(tmp_path / "cache"))
    text = (ROOT / "configs" / config).read_text()
    diff, cli, at_kill = kill_resume_compare(tmp_path, text, [*TINY, *overrides], kill_step)
    assert at_kill["global_step"] == kill_step // 2 * 2  # the last save before the kill
    assert cli.trainer.global_step > at_kill["global_step"]
    assert diff <= TOL, f"{case}: max |w diff| {diff:.3g}"


GRADUAL = BASE.replace("trainer:\n", """trainer:
  callbacks:
    - class_path: tl_lightning.callbacks.unfreezing.GradualUnfreezing
      init_args: {unfreeze_at_epoch: 1, bn: eval, restart_schedule: true}
""")  # fmt: skip


def test_gradual_unfreezing_killed_in_the_unfrozen_phase_resumes_unfrozen(tmp_path):
    # frozen BN layers sit in eval mode in phase 0; a resumed phase-1 epoch that kept setup's
    # frozen state would leave them (and every backbone weight) untouched: num_batches_tracked shows it
    args = ["--model.init_args.lr_scheduler=tl_lightning.optim.OneCycleLR"]
    diff, cli, at_kill = kill_resume_compare(tmp_path, GRADUAL, args, kill_step=7)
    assert at_kill["global_step"] == 6 and at_kill["epoch"] == 1  # 1 step into phase 1
    tracked = at_kill["state_dict"]["backbone.body.0.1.num_batches_tracked"]
    assert tracked == 1  # phase 0 ran BN in eval mode; phase 1 one train-mode batch so far
    final = cli.trainer.lightning_module.backbone.body[0][1].num_batches_tracked
    assert final == 5  # the 4 batches after the resume ran in train mode too
    assert diff <= TOL, f"GradualUnfreezing, bn eval: max |w diff| {diff:.3g}"


# --- two-process CPU DDP ------------------------------------------------------------------------
def test_two_process_ddp_resume_matches_uninterrupted(tmp_path):
    (tmp_path / "case.yaml").write_text(BASE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu",
           "--model.init_args.lr_scheduler=tl_lightning.optim.OneCycleLR",
           "--data.init_args.batch_size=16"]  # fmt: skip

    def fit(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "tl_lightning", "fit", "--config", "case.yaml", *ddp, *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=240)  # fmt: skip

    done = fit("--trainer.logger=false", "--checkpoint.dirpath=uninterrupted")
    assert done.returncode == 0, done.stderr[-3000:]
    # 179 images over 2 ranks: 5 steps of 16 per epoch; every rank kills itself at step 3
    killed = fit("--trainer.callbacks+=tests.test_faults.KillAtStep", "--trainer.callbacks.step=3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "runs/default/version_0/checkpoints/last.ckpt"
    at_kill = torch.load(last, map_location="cpu", weights_only=True)
    assert at_kill["global_step"] == 2 and at_kill["epoch"] == 0
    rng = next(v for k, v in at_kill["callbacks"].items() if "RNGStateCheckpoint" in k)
    assert len(rng["rng_per_rank"]) == 2  # each rank's own stream
    resumed = fit("--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    diff = max_weight_diff(tmp_path / "uninterrupted/last.ckpt", last)
    assert diff <= TOL, f"2-process DDP: max |w diff| {diff:.3g}"
