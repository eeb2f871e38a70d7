"""WiSE-FT: a=0 is the start, a=1 the fine-tuned model, a is chosen on validation; the callback saves it."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import quick_trainer, tiny_digits
from tl_lightning.callbacks import WiseFT
from tl_lightning.modules import FineTuneModule
from tl_lightning.wise_ft import interpolate_state, wise_ft


def _fine_tuned_model():
    torch.manual_seed(0)
    model = FineTuneModule(num_classes=4, backbone="resnet18", weights=None, track_forgetting=True, channels_last=False)
    with torch.no_grad():  # stands for fine-tuning: every weight and BN statistic moves
        for t in [*model.backbone.parameters(), *model.head.parameters()]:
            t.add_(0.05 * torch.randn_like(t))
        for b in model.backbone.buffers():
            if b.is_floating_point():
                b.mul_(1.5)
    return model.eval()


def test_interpolation_is_the_weighted_mean():
    s = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    e = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(7)}
    out = interpolate_state(s, e, 0.25)
    assert out["w"].tolist() == [0.5, 3.0] and int(out["n"]) == 7


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_endpoints_reproduce_the_start_and_the_fine_tuned_predictions(a):
    model = _fine_tuned_model()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        start_logits = model.start.head(model.start.backbone(x))
        ft_logits = model(x)
    assert not torch.allclose(start_logits, ft_logits)
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=3)
    wise_ft(model, loader, grid=[a])
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, start_logits if a == 0 else ft_logits)


def test_a_is_the_best_on_validation():
    model = _fine_tuned_model()
    x = torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        labels = model.start.head(model.start.backbone(x)).argmax(1)  # the start is 100% right here
    loader = DataLoader(TensorDataset(x, labels), batch_size=4)
    result = wise_ft(model, loader, grid=[1.0, 0.5, 0.0])
    assert [r["a"] for r in result.curve] == [0.0, 0.5, 1.0]
    accs = [r["val_acc"] for r in result.curve]
    assert accs[0] == 1.0
    assert result.a == min(r["a"] for r in result.curve if r["val_acc"] == max(accs))


def test_callback_saves_the_chosen_checkpoint(tmp_path):
    model = FineTuneModule(
        num_classes=10, backbone="resnet18", weights=None, track_forgetting=True, channels_last=False,
        optimizer=functools.partial(torch.optim.SGD, lr=0.05),
    )
    # 4 small reference images: the source-agreement column is computed, at a fraction of the cost
    callback = WiseFT(grid=[0.0, 0.5, 1.0], dirpath=str(tmp_path), num_reference_images=4, reference_image_size=32)
    trainer = quick_trainer(tmp_path, limit_train_batches=3, limit_val_batches=2, callbacks=[callback])
    trainer.fit(model, tiny_digits())
    assert callback.result.a in (0.0, 0.5, 1.0)
    loaded = FineTuneModule.load_from_checkpoint(callback.checkpoint_path)
    for k, v in callback.result.state["head"].items():
        torch.testing.assert_close(loaded.head.state_dict()[k], v)
    for k, v in model.start.state_dict().items():  # the starting point travels with the checkpoint
        torch.testing.assert_close(loaded.start.state_dict()[k], v)


def test_ties_go_to_the_smallest_a():
    model = _fine_tuned_model()
    x = torch.randn(8, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    # a = 1e-6 and a = 0 predict the same classes: the tie goes to the start side
    result = wise_ft(model, loader, grid=[1e-6, 0.0])
    assert result.curve[0]["val_acc"] == result.curve[1]["val_acc"]
    assert result.a == 0.0
