"""configs/digits/gradual_seeds.yaml run through both milestones: what trains, and at which LR, step by step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.cli import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "digits" / "gradual_seeds.yaml"
GROUPS = ["stem", *(f"blocks.{i}" for i in range(7)), "neck"]  # efficientnet_lite0, input first
HEAD_LR, RATIO, DECAY, WARMUP = 1e-3, 0.1, 0.7, 20  # the config's values


@pytest.mark.filterwarnings("ignore:`ModelCheckpoint\\(monitor='val/acc'\\)` could not find")
def test_gradual_seeds_recipe_unfreezes_the_last_block_then_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--data.init_args.image_size=32",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
            "--trainer.max_epochs=11",
            "--trainer.limit_train_batches=2",  # epoch e starts at step 2e (a bare 1 parses as 1.0: all)
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.default_root_dir=.",
            "--trainer.callbacks+=tests.callbacks.test_unfreezing_schedule.Recorder",
        ]
    )
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Recorder")
    unfreezing = next(c for c in cli.trainer.callbacks if isinstance(c, GradualUnfreezing))
    assert unfreezing.bn.value == "stats"
    steps = {s["step"]: s for s in recorder.steps}
    assert sorted(steps) == list(range(22))

    # independent schedule: epoch 5 (step 10) -> blocks.6 and neck, epoch 10 (step 20) -> all
    def unfrozen_at(group: str) -> int:
        return 10 if group in ("blocks.6", "neck") else 20

    for step, s in steps.items():
        trainable = [g for g in GROUPS if unfrozen_at(g) <= step]
        assert s["trains"] == trainable, step
        assert s["lrs"]["head"] == pytest.approx(HEAD_LR)
        for depth, group in enumerate(reversed(GROUPS), start=1):
            target = HEAD_LR * RATIO * DECAY ** (depth - 1)
            ramp = (step - unfrozen_at(group) + 1) / WARMUP if step >= unfrozen_at(group) else 0
            assert s["lrs"][f"backbone.{group}"] == pytest.approx(target * min(1, ramp)), (
                step,
                group,
            )
