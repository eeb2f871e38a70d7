"""Predict CSV rows against an independent softmax: the file, the argmax class name and its probability."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from tl_lightning.callbacks.prediction_writer import CSVPredictionWriter
from tl_lightning.modules.feature_extraction import FeatureExtractionModule

NAMES = ["cat", "dog", "fox"]
LOGITS = [[2.0, 0.0, -1.0], [0.0, 3.0, 1.0], [0.5, 0.4, 2.5], [1.0, 1.0, 0.0], [-2.0, 0.0, -1.0]]


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_csv_has_one_row_per_image_with_the_argmax_class_and_its_probability(tmp_path):
    model = FeatureExtractionModule(
        num_classes=3, backbone="resnet18", weights=None, class_names=NAMES, channels_last=False
    )
    model.forward = lambda x: x.flatten(1)[:, :3]  # the images are the logits here
    items = [(torch.tensor(row).view(3, 1, 1), f"img_{i}.png") for i, row in enumerate(LOGITS)]

    def collate(batch):
        return torch.stack([x for x, _ in batch]), [name for _, name in batch]

    out = tmp_path / "preds.csv"
    Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CSVPredictionWriter(str(out))],
        default_root_dir=tmp_path,
    ).predict(model, DataLoader(items, batch_size=2, collate_fn=collate), return_predictions=False)

    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "class", "probability"]
    assert len(rows) == 1 + len(LOGITS)
    for i, (row, logits) in enumerate(zip(rows[1:], LOGITS)):
        probs = _softmax(logits)
        best = max(range(3), key=lambda k: (probs[k], -k))  # ties: the first class, as argmax
        assert row[0] == f"img_{i}.png"
        assert row[1] == NAMES[best], (i, row)
        assert float(row[2]) == pytest.approx(probs[best], abs=1e-6), (i, row)
    assert [r[1] for r in rows[1:]] == ["cat", "dog", "fox", "cat", "dog"]  # worked by hand
