"""Forgetting measures: CKA by its HSIC formula, agreement 1.0 at the start and lower when perturbed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import quick_trainer
from tl_lightning.backbones.source_head import imagenet_class_names, source_classifier
from tl_lightning.callbacks import ForgettingMonitor
from tl_lightning.data import DigitsDataModule
from tl_lightning.forgetting import ReferenceSet, default_reference_images, linear_cka
from tl_lightning.modules import FineTuneModule


def test_linear_cka_matches_the_hsic_formula_and_its_invariances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 6, generator=g), torch.randn(20, 4, generator=g)
    h = torch.eye(20) - 1 / 20  # centering matrix
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    expected = hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_))
    assert float(linear_cka(x, y)) == pytest.approx(float(expected), rel=1e-4)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert float(linear_cka(x, 3 * x @ q + 1)) == pytest.approx(1.0, abs=1e-5)


def test_default_reference_set_is_seeded_real_photo_crops():
    a, b = default_reference_images(6, 32, seed=0), default_reference_images(6, 32, seed=0)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, default_reference_images(6, 32, seed=1))
    assert a.float().std() > 20  # photos, not blank images


@pytest.fixture(scope="module")
def model():
    return FineTuneModule(num_classes=3, track_forgetting=True, channels_last=False)


def test_source_agreement_is_one_at_the_start_and_drops_when_the_backbone_is_perturbed(model):
    ref = ReferenceSet.default(model.backbone.data_config, num_images=24, image_size=96)
    before = ref.measure(model.backbone, model.start)
    assert before["source_agreement"] == 1.0
    assert before["cka_drift"] == pytest.approx(0.0, abs=1e-4)
    saved = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    after = ref.measure(model.backbone, model.start)
    model.backbone.load_state_dict(saved)
    assert after["source_agreement"] < 0.9
    assert after["cka_drift"] > 0.01
    # the start's cached outputs are still the start's, not the perturbed network's
    assert ref.measure(model.backbone, model.start)["source_agreement"] == 1.0


def test_labelled_source_dir_gives_source_accuracy_and_forgetting(model, tmp_path):
    import skimage.data

    names = imagenet_class_names()
    for cls, photo in (("tabby", skimage.data.chelsea()), ("espresso", skimage.data.coffee())):
        (tmp_path / cls).mkdir()
        for i, (top, left) in enumerate(((0, 0), (40, 60), (20, 100))):
            Image.fromarray(np.ascontiguousarray(photo[top : top + 250, left : left + 300])).save(tmp_path / cls / f"{i}.jpg")
    ref = ReferenceSet.from_folder(tmp_path, model.backbone.data_config, names, image_size=128)
    assert ref.labels.tolist() == [names.index("espresso")] * 3 + [names.index("tabby")] * 3
    expected = float((model.start.source_logits(ref.images).argmax(1) == ref.labels).float().mean())
    out = ref.measure(model.backbone, model.start)
    assert out["source_acc"] == pytest.approx(expected)
    assert out["forgetting"] == 0.0
    with pytest.raises(ValueError, match="not source classes"):
        (tmp_path / "not_a_class").mkdir()
        ReferenceSet.from_folder(tmp_path, model.backbone.data_config, names)


def test_no_source_classifier_without_pretrained_weights():
    assert source_classifier("resnet18", None) is None
    assert source_classifier("efficientnet_lite0", "DEFAULT", layer="blocks.3") is None


def test_monitor_logs_the_measures_at_validation(tmp_path):
    model = FineTuneModule(num_classes=10, channels_last=False)
    assert model.start is None  # turned on by the callback
    dm = DigitsDataModule(backbone="efficientnet_lite0", image_size=32, batch_size=16)
    trainer = quick_trainer(tmp_path, limit_train_batches=2, limit_val_batches=1, callbacks=[ForgettingMonitor(num_images=8, image_size=64)])
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert 0.0 <= float(metrics["val/source_agreement"]) <= 1.0
    assert 0.0 <= float(metrics["val/cka_drift"]) <= 1.0
    assert model.start is not None and model.start.source_head is not None


def test_keep_bn_statistics_keeps_the_pretrained_running_statistics_in_training():
    moved = {}
    for keep in (False, True):
        m = FineTuneModule(num_classes=3, backbone="resnet18", weights=None, keep_bn_statistics=keep, channels_last=False)
        before = m.backbone.body.bn1.running_mean.clone()
        m.train()
        m(torch.randn(4, 3, 32, 32) + 3)
        moved[keep] = not torch.equal(before, m.backbone.body.bn1.running_mean)
        assert m.backbone.body.bn1.weight.requires_grad  # affine weights still train
    assert moved == {False: True, True: False}
