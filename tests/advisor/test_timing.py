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
    # fine-tuning validates at the training precision; feature extraction at its own
    t = Timing(
        forward=0.1, last=0.3, full=1.0, train_steps=10, val_steps=4, load=0.0, val_forward=0.4
    )
    assert abs(t.epoch_seconds("feature_extraction") - (10 * 0.1 + 4 * 0.1)) < 1e-12
    assert abs(t.epoch_seconds("full_finetune") - (10 * 1.0 + 4 * 0.4)) < 1e-12
    assert abs(t.epoch_seconds("last_groups") - (10 * 0.3 + 4 * 0.4)) < 1e-12


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


def test_only_what_the_embedding_did_not_measure_is_timed(monkeypatch):
    from tl_lightning.advisor import timing

    calls = []

    def fake_median(step, batches, device, warm_up=1):
        calls.append(warm_up)
        return 0.5 + len(calls)  # 1.5, 2.5, 3.5: which call gave which number

    monkeypatch.setattr(timing, "_median_step", fake_median)
    bb = build_backbone("resnet18", weights=None)
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2,))) for _ in range(3)]
    # the embedding's forward at the training precision: only the two training steps run, and
    # only the first (every group trainable) has a warm-up step
    t = measure_timing(
        bb, batches, 3, 5, 2, "32-true", frozen_forward=0.25, frozen_precision="32-true"
    )
    assert calls == [1, 0]
    assert (t.full, t.last, t.forward, t.val_forward) == (1.5, 2.5, 0.25, None)
    # another precision than training's: the eval forward at the training precision is timed
    calls.clear()
    t = measure_timing(
        bb, batches, 3, 5, 2, "32-true", frozen_forward=0.25, frozen_precision="bf16-mixed"
    )
    assert calls == [1, 0, 0] and (t.forward, t.val_forward) == (0.25, 3.5)
    # nothing from the embedding (a feature cache hit): the frozen forward is timed too
    calls.clear()
    t = measure_timing(bb, batches, 3, 5, 2, "32-true")
    assert calls == [1, 0, 1] and (t.forward, t.val_forward) == (3.5, None)


def test_embedding_forward_seconds_per_image_leave_the_first_batch_out():
    from tl_lightning.advisor.advise import _TimedForward

    timed = _TimedForward(None, torch.device("cpu"))
    timed.seconds = [5.0, 1.0, 1.0, 0.25]  # 200 images in batches of 64, 64, 64, 8
    assert timed.per_image(200, 64) == pytest.approx(2.25 / (200 - 64))
    timed.seconds = [0.8]  # a single batch: its warm-up is all there is
    assert timed.per_image(20, 64) == pytest.approx(0.8 / 20)
    timed.seconds = []
    assert timed.per_image(20, 64) is None
