"""Per-class test metrics against a hand-counted confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.modules.feature_extraction import FeatureExtractionModule

NAMES = ["cat", "dog", "fox"]
# hand-picked (true, predicted) pairs: an asymmetric confusion, so precision != recall per class
PAIRS = [(0, 0)] * 4 + [(0, 1)] * 2 + [(1, 1)] * 3 + [(1, 2)] * 1 + [(2, 2)] * 1 + [(2, 0)] * 3


def _explicit_metrics():
    tp = {c: sum(1 for t, p in PAIRS if t == c and p == c) for c in range(3)}
    true = {c: sum(1 for t, _ in PAIRS if t == c) for c in range(3)}
    pred = {c: sum(1 for _, p in PAIRS if p == c) for c in range(3)}
    recall = {c: tp[c] / true[c] for c in range(3)}
    precision = {c: tp[c] / pred[c] for c in range(3)}
    f1 = {c: 2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in range(3)}
    return recall, precision, f1


def test_per_class_precision_recall_f1_and_accuracy_match_the_confusion_counts(tmp_path):
    recall, precision, f1 = _explicit_metrics()
    # hand-worked: cat 4/6 recall, 4/7 precision; dog 3/4, 3/5; fox 1/4, 1/2
    assert (recall[0], precision[0], recall[2], precision[2]) == (4 / 6, 4 / 7, 1 / 4, 1 / 2)
    model = FeatureExtractionModule(
        num_classes=3, backbone="resnet18", weights=None, class_names=NAMES, channels_last=False
    )
    model.forward = lambda x: x.flatten(1)[:, :3]  # the images *are* the logits here
    y = torch.tensor([t for t, _ in PAIRS])
    x = torch.nn.functional.one_hot(torch.tensor([p for _, p in PAIRS]), 3).float() * 5
    x = x.view(len(PAIRS), 3, 1, 1)
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=5), verbose=False)
    m = trainer.callback_metrics
    for c, name in enumerate(NAMES):
        assert m[f"test/recall/{name}"].item() == pytest.approx(recall[c]), name
        assert m[f"test/precision/{name}"].item() == pytest.approx(precision[c]), name
        assert m[f"test/f1/{name}"].item() == pytest.approx(f1[c]), name
    assert m["test/acc"].item() == pytest.approx(8 / len(PAIRS))
    assert m["test/f1_macro"].item() == pytest.approx(sum(f1.values()) / 3)
    cm = model.last_confusion_matrix
    expected = torch.zeros(3, 3)
    for t, p in PAIRS:
        expected[t, p] += 1
    assert torch.equal(cm, expected)
