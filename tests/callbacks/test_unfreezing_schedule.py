"""GradualUnfreezing against its documented schedule: which groups train when, and at which LR, step by step."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.callbacks.unfreezing import GradualUnfreezing
from tl_lightning.modules.finetune import FineTuneModule

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4"]  # resnet18, input side first
LR = 0.01
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no"),
]


class Recorder(Callback):
    """Per optimizer step: which backbone groups have trainable params, and every group's LR."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        trains = [
            g.name
            for g in pl_module.backbone.layer_groups()
            if any(p.requires_grad and p.grad is not None for p in g.params)
        ]
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        self.steps.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "trains": trains,
                "lrs": lrs,
            }
        )


def make_model(module_cls=FineTuneModule):
    seed_everything(0)
    return module_cls(
        num_classes=3,
        backbone="resnet18",
        weights=None,
        optimizer=functools.partial(torch.optim.SGD, lr=LR),
        channels_last=False,
    )


def train(model, callbacks: list[Callback], max_epochs: int, batches: int) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
    )
    Trainer(
        max_epochs=max_epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    ).fit(model, DataLoader(data, batch_size=4))


def fit(callback: GradualUnfreezing, max_epochs: int, batches: int = 2) -> list[dict]:
    recorder = Recorder()
    train(make_model(), [callback, recorder], max_epochs, batches)
    return recorder.steps


def test_every_n_epochs_unfreezes_one_group_at_a_time_from_the_top():
    steps = fit(GradualUnfreezing(every_n_epochs=2, log_lrs=False), max_epochs=7, batches=1)
    trains = {s["epoch"]: s["trains"] for s in steps}
    # independent schedule: group k from the top (k = 1, 2, ...) unfreezes at epoch 2k
    for epoch in range(7):
        expected = GROUPS[len(GROUPS) - epoch // 2 :] if epoch >= 2 else []
        assert trains[epoch] == expected, epoch
        for name in GROUPS:
            lr = steps[epoch]["lrs"][f"backbone.{name}"]
            assert (lr > 0) == (name in expected), (epoch, name, lr)


def test_warmup_ramps_a_newly_unfrozen_group_linearly_from_zero():
    warmup = 3
    callback = GradualUnfreezing(
        unfreeze_at_epoch=1, lr_ratio=0.5, warmup_steps=warmup, log_lrs=False
    )
    steps = fit(callback, max_epochs=4, batches=2)
    unfrozen_at = 2  # epoch 1 starts at global step 2
    for s in steps:
        head, top = s["lrs"]["head"], s["lrs"]["backbone.layer4"]
        assert head == pytest.approx(LR)
        if s["step"] < unfrozen_at:
            assert top == 0.0
        else:  # step u, u+1, u+2: 1/3, 2/3, 3/3 of the target, then the target
            ramp = min(1.0, (s["step"] - unfrozen_at + 1) / warmup)
            assert top == pytest.approx(0.5 * LR * ramp), s
    assert [s["step"] for s in steps] == list(range(8))


def test_lr_ratio_and_decay_give_each_group_its_own_lr():
    callback = GradualUnfreezing(unfreeze_at_epoch=1, lr_ratio=0.5, lr_decay=0.25, log_lrs=False)
    steps = fit(callback, max_epochs=2, batches=1)
    lrs = steps[-1]["lrs"]
    # top group: head * ratio; each group toward the input: * decay once more
    for depth, name in enumerate(reversed(GROUPS)):
        assert lrs[f"backbone.{name}"] == pytest.approx(LR * 0.5 * 0.25**depth), name


def test_lr_spread_is_fastais_geometric_slice():
    callback = GradualUnfreezing(unfreeze_at_epoch=1, lr_spread=100.0, log_lrs=False)
    lrs = fit(callback, max_epochs=2, batches=1)[-1]["lrs"]
    # slice(lr/100, lr): 5 groups below the head, each a factor 100**(1/5) lower than the one above
    step = 100.0 ** (1 / len(GROUPS))
    for depth, name in enumerate(reversed(GROUPS), start=1):
        assert lrs[f"backbone.{name}"] == pytest.approx(LR / step**depth), name
    assert lrs["backbone.stem"] == pytest.approx(LR / 100)


def test_milestones_and_unfrozen_lr_scale():
    callback = GradualUnfreezing(
        milestones={1: ["layer4"], 2: ["layer[23]"]}, unfrozen_lr_scale=0.5, log_lrs=False
    )
    steps = fit(callback, max_epochs=3, batches=1)
    assert [s["trains"] for s in steps] == [[], ["layer4"], ["layer2", "layer3", "layer4"]]
    assert steps[0]["lrs"]["head"] == pytest.approx(LR)
    assert steps[1]["lrs"]["head"] == pytest.approx(LR * 0.5)  # fastai's halving once unfrozen
    assert steps[2]["lrs"]["backbone.layer2"] == pytest.approx(LR * 0.5)


def test_lr_growth_is_backbone_finetunings_per_epoch_multiplier_capped_at_the_head():
    # layer4 at epoch 1, layer3 at epoch 2; ratio 0.1, growth 1.5 per epoch after each unfreezes
    # (any multiplier; BackboneFinetuning's own default is checked against Lightning below)
    callback = GradualUnfreezing(
        milestones={1: ["layer4"], 2: ["layer3"]}, lr_ratio=0.1, lr_growth=1.5, log_lrs=False
    )
    steps = fit(callback, max_epochs=9, batches=1)
    for s in steps:
        assert s["lrs"]["head"] == pytest.approx(LR)
        for name, start in (("layer4", 1), ("layer3", 2)):
            lr = s["lrs"][f"backbone.{name}"]
            if s["epoch"] < start:
                assert lr == 0.0
            else:  # 0.1 lr, x1.5 each epoch, at most the head's lr
                expected = LR * 0.1
                for _ in range(s["epoch"] - start):
                    expected = min(expected * 1.5, LR)
                assert lr == pytest.approx(expected), (s["epoch"], name)
    assert steps[-1]["lrs"]["backbone.layer4"] == pytest.approx(LR)  # 0.1 * 1.5**7 > 1: capped


class BackboneLR(Callback):
    """The LR of the optimizer group holding the backbone's first conv, at each epoch's first step."""

    def __init__(self):
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        conv = pl_module.backbone.body.conv1.weight
        group = next(
            (g for g in optimizer.param_groups if any(p is conv for p in g["params"])), None
        )
        self.lrs.setdefault(
            trainer.current_epoch, group["lr"] if group and conv.grad is not None else 0.0
        )


def test_lr_growth_2_is_lightning_backbone_finetunings_default_schedule():
    # the expected LRs come from Lightning's own callback (its lambda_func default doubles the
    # backbone LR each epoch, up to the head's), not from our arithmetic
    from lightning.pytorch.callbacks import BackboneFinetuning

    from tl_lightning.modules.base import ClassifierModule

    def run(module_cls, callback) -> dict[int, float]:
        recorder = BackboneLR()
        train(make_model(module_cls), [callback, recorder], max_epochs=8, batches=1)
        return recorder.lrs

    lightning = run(
        ClassifierModule,
        BackboneFinetuning(unfreeze_backbone_at_epoch=2, backbone_initial_ratio_lr=0.1),
    )
    ours = run(
        FineTuneModule,
        GradualUnfreezing(unfreeze_at_epoch=2, lr_ratio=0.1, lr_growth=2.0, log_lrs=False),
    )
    assert lightning[2] == pytest.approx(LR * 0.1) and lightning[7] == pytest.approx(LR)  # capped
    assert ours == pytest.approx(lightning)
