"""Per-strategy epoch times from measured step times; the caller's backbone is left untouched."""

from __future__ import annotations

import pytest
import torch

from tl_lightning.advisor.timing import Timing, measure_timing, steps_per_epoch
from tl_lightning.backbones import build_backbone


def test_epoch_seconds_by_hand():
    t = Timing(forward=0.1, last=0.3, full=1.0, train_steps=10, val_steps=4, load=0.05)
    val = 4 * (0.05 + 0.1)
    assert abs(t.epoch_seconds("feature_extraction") - (10 * 0.15 + val)) < 1e-12
    assert abs(t.epoch_seconds("last_groups") - (10 * 0.35 + val)) < 1e-12
    assert abs(t.epoch_seconds("full_finetune") - (10 * 1.05 + val)) < 1e-12
    assert t.epoch_seconds("gradual_unfreezing") == t.epoch_seconds("full_finetune")


def test_steps_per_epoch():
    assert steps_per_epoch(100, 32, drop_last=True) == 3
    assert steps_per_epoch(100, 32, drop_last=False) == 4
    assert steps_per_epoch(20, 32, drop_last=True) == 1  # the datamodule keeps a single short batch


def test_measure_timing_leaves_the_backbone_alone():
    bb = build_backbone("resnet18", weights=None)
    bb.freeze(["stem", "layer1"], bn="eval")
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    grads = [p.requires_grad for p in bb.parameters()]
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))) for _ in range(2)]
    t = measure_timing(bb, batches, 3, train_steps=5, val_steps=2)
    assert t.forward > 0 and t.last > 0 and t.full > 0
    assert [p.requires_grad for p in bb.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


class _FakeClock:
    """``time`` stand-in whose clock a step advances by scripted durations."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def step(self, x, y):
        self.now += self.durations[self.calls]
        self.calls += 1


def test_timing_skips_the_warm_up_and_stops_once_two_steps_agree(monkeypatch):
    from tl_lightning.advisor import timing

    batches = [(None, None)] * 4
    clock = _FakeClock([5.0, 1.0, 1.05, 9.0])  # warm-up, then two steps 5 % apart
    monkeypatch.setattr(timing, "time", clock)
    assert timing._median_step(clock.step, batches, torch.device("cpu")) == pytest.approx(1.025)
    assert clock.calls == 3  # the fourth batch was not needed

    clock = _FakeClock([5.0, 1.0, 2.0, 1.2])  # they disagree: all batches, the median of three
    monkeypatch.setattr(timing, "time", clock)
    assert timing._median_step(clock.step, batches, torch.device("cpu")) == pytest.approx(1.2)
    assert clock.calls == 4

    clock = _FakeClock([5.0, 1.0])  # two batches: one warm-up, one timed
    monkeypatch.setattr(timing, "time", clock)
    assert timing._median_step(clock.step, batches[:2], torch.device("cpu")) == pytest.approx(1.0)
