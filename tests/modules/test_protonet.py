"""ProtoNetModule: logits, prototypes, label remapping, BN modes, fitting (also DDP), CI, predict, configs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image

from tests.helpers import print_config
from tl_lightning.cli import run_cli
from tl_lightning.data.digits import load_digits_images
from tl_lightning.data.few_shot import FewShotDataModule
from tl_lightning.data.flowers102 import Flowers102Source
from tl_lightning.errors import DataError
from tl_lightning.modules.protonet import (
    ProtoNetModule,
    class_prototypes,
    predict_few_shot,
    prototype_logits,
    remap_labels,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "protonet"
TINY = {"dataset": "digits", "backbone": "conv4", "image_size": 16, "way": 3, "shot": 1, "query": 2}
QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def tiny_model(**kwargs) -> ProtoNetModule:
    torch.manual_seed(0)
    return ProtoNetModule(**{"backbone": "conv4", "weights": None, "num_classes": 3, **kwargs})


def test_logits_are_minus_squared_euclidean_distances():
    q, p = torch.randn(7, 4), torch.randn(3, 4)
    expected = torch.tensor(
        [[-sum((q[i, d] - p[j, d]) ** 2 for d in range(4)) for j in range(3)] for i in range(7)]
    )
    torch.testing.assert_close(prototype_logits(q, p), expected)
    cos = torch.tensor(
        [[float(q[i] @ p[j] / (q[i].norm() * p[j].norm())) for j in range(3)] for i in range(7)]
    )
    torch.testing.assert_close(prototype_logits(q, p, "cosine", 10.0), 10 * cos)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batched_episodes_give_the_per_episode_logits_and_prototypes(distance):
    emb, labels = torch.randn(6, 10, 64) * 5 + 3, torch.randint(0, 4, (6, 10))
    protos = class_prototypes(emb, labels, 4)  # [episodes, classes, dim]
    q = torch.randn(6, 9, 64) * 5 + 3
    batched = prototype_logits(q, protos, distance, 2.0)
    for e in range(6):
        torch.testing.assert_close(protos[e], class_prototypes(emb[e], labels[e], 4))
        torch.testing.assert_close(batched[e], prototype_logits(q[e], protos[e], distance, 2.0))


def test_prototypes_are_support_means_and_labels_are_remapped():
    support_labels = torch.tensor([9, 3, 7, 3, 9, 7, 9])  # shuffled, non-contiguous class ids
    classes, s, q = remap_labels(support_labels, torch.tensor([7, 9, 3, 3]))
    assert classes.tolist() == [3, 7, 9]
    assert s.tolist() == [2, 0, 1, 0, 2, 1, 2] and q.tolist() == [1, 2, 0, 0]
    emb = torch.randn(7, 5)
    protos = class_prototypes(emb, s, 3)
    for k, c in enumerate([3, 7, 9]):
        torch.testing.assert_close(protos[k], emb[support_labels == c].mean(0))
    with pytest.raises(DataError, match=r"\[4\]"):
        remap_labels(support_labels, torch.tensor([3, 4]))


def test_episode_logits_match_an_independent_computation():
    model = tiny_model().eval()
    support, query = torch.randn(6, 3, 16, 16), torch.randn(4, 3, 16, 16)
    s_labels, q_labels = torch.tensor([8, 2, 5, 2, 8, 5]), torch.tensor([5, 8, 2, 2])
    logits, target = model.episode_logits(support, s_labels, query, q_labels)
    with torch.no_grad():
        s_emb, q_emb = model.backbone(support), model.backbone(query)
    protos = torch.stack([s_emb[s_labels == c].mean(0) for c in (2, 5, 8)])
    expected = -((q_emb[:, None] - protos[None]) ** 2).sum(-1)
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-4, atol=1e-4)
    assert target.tolist() == [1, 2, 0, 0]


def test_cosine_temperature_is_learnable_and_projection_changes_the_dim():
    model = tiny_model(distance="cosine", temperature=5.0, projection_dim=8)
    assert model.embed(torch.randn(2, 3, 16, 16)).shape == (2, 8)
    logits, target = model.episode_logits(
        torch.randn(3, 3, 16, 16),
        torch.tensor([0, 1, 2]),
        torch.randn(3, 3, 16, 16),
        torch.tensor([0, 1, 2]),
    )
    torch.nn.functional.cross_entropy(logits, target).backward()
    assert model.temperature.grad is not None
    assert {g["name"] for g in model.param_groups()} == {"backbone", "head"}


class RecordBN(Callback):
    """Records whether any BatchNorm is in training mode in each stage's batches."""

    def __init__(self):
        self.seen: dict[str, set[bool]] = {}

    def _record(self, stage, module):
        bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.seen.setdefault(stage, set()).update(m.training for m in bns)

    def on_train_batch_start(self, trainer, module, *args):
        self._record("train", module)

    def on_validation_batch_start(self, trainer, module, *args):
        self._record("val", module)

    def on_test_batch_start(self, trainer, module, *args):
        self._record("test", module)


@pytest.mark.parametrize("freeze", [False, True])
def test_fit_fast_dev_run_with_bn_in_eval_at_val_and_test(freeze):
    dm = FewShotDataModule(**TINY)
    model = tiny_model(freeze_backbone=freeze, projection_dim=4 if freeze else None)
    record = RecordBN()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = Trainer(fast_dev_run=True, callbacks=[record], **QUIET)
    trainer.fit(model, dm)
    assert "val/acc" in trainer.callback_metrics
    trainer.test(model, dm, verbose=False)
    assert record.seen["val"] == {False} and record.seen["test"] == {False}
    assert record.seen["train"] == (
        {False} if freeze else {True}
    )  # frozen BN statistics never move
    moved = any(not torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert moved != freeze


def _bn_stats(model: ProtoNetModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}


@pytest.mark.parametrize("bn", ["affine", "train"])
def test_bn_affine_keeps_running_statistics_while_weights_train(bn):
    dm = FewShotDataModule(**TINY)
    model = tiny_model(bn=bn)
    stats, record = _bn_stats(model), RecordBN()
    weights = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" not in k}
    Trainer(max_steps=2, limit_val_batches=0, callbacks=[record], **QUIET).fit(model, dm)
    after = _bn_stats(model)
    assert all(torch.equal(stats[k], after[k]) for k in stats) == (bn == "affine")
    assert record.seen["train"] == {bn == "train"}
    state = model.backbone.state_dict()
    assert any(not torch.equal(v, state[k]) for k, v in weights.items())  # conv/affine still train
    model.train()  # an explicit .train() keeps the policy
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {m.training for m in bns} == {bn == "train"}


def test_bn_auto_keeps_pretrained_statistics_and_updates_random_init_ones():
    assert tiny_model().bn == "train"  # weights=None
    assert ProtoNetModule(backbone="conv4", num_classes=3).bn == "train"  # conv4 DEFAULT = random
    assert ProtoNetModule(backbone="efficientnet_lite0", num_classes=3).bn == "affine"
    with pytest.raises(ValueError, match="unknown bn 'frozen'"):
        tiny_model(bn="frozen")


@pytest.mark.parametrize("per_batch", [1, 5, 100])  # 24 episodes: one per step, 5 + ... + 4, all
def test_frozen_cached_evaluation_matches_uncached_and_reports_the_ci(per_batch):
    dm = FewShotDataModule(**TINY, test_episodes=24, eval_episodes_per_batch=per_batch)
    cached = tiny_model(freeze_backbone=True)
    plain = tiny_model(freeze_backbone=True, cache_embeddings=False)
    Trainer(**QUIET).test(cached, dm, verbose=False)
    Trainer(**QUIET).test(plain, dm, verbose=False)
    torch.testing.assert_close(cached.test_episode_accuracies, plain.test_episode_accuracies)
    assert cached._cache["test"][1].shape == (len(dm.test_set), 64)  # embedded once


def test_600_episode_test_logs_mean_and_ci95(capsys):
    dm = FewShotDataModule(**TINY, test_episodes=600)
    model = tiny_model(freeze_backbone=True)
    result = Trainer(**QUIET).test(model, dm, verbose=False)[0]
    accs = model.test_episode_accuracies
    assert accs.numel() == 600
    assert result["test/acc"] == pytest.approx(float(accs.mean()), abs=1e-6)
    assert result["test/acc_ci95"] == pytest.approx(
        1.96 * float(accs.std()) / math.sqrt(600), abs=1e-6
    )
    assert 0 < result["test/acc_ci95"] < 0.05


def test_val_or_test_way_must_match_num_classes():
    dm = FewShotDataModule(**{**TINY, "way": 2})
    with pytest.raises(DataError, match="2 classes but the model evaluates 3-way"):
        Trainer(**QUIET).test(tiny_model(), dm, verbose=False)


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from lightning.pytorch import Trainer, seed_everything
    from tl_lightning.data.few_shot import FewShotDataModule
    from tl_lightning.modules.protonet import ProtoNetModule

    out = sys.argv[1]
    seed_everything(0)
    dm = FewShotDataModule("digits", backbone="conv4", image_size=16, way=3, shot=1, query=2,
                           train_episodes=6, val_episodes=4, test_episodes=10)
    model = ProtoNetModule(backbone="conv4", weights=None, num_classes=3)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    torch.save(model.state_dict(), f"{out}/rank{trainer.global_rank}.pt")
    trainer.test(model, dm, verbose=False)
    json.dump({"results": model.test_results, "steps": trainer.global_step},
              open(f"{out}/rank{trainer.global_rank}.json", "w"))
    """
)


def test_two_process_ddp_fit_syncs_weights_and_gathers_test_episodes(tmp_path):
    script = tmp_path / "ddp_protonet.py"
    script.write_text(DDP_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == 3  # 6 episodes over 2 ranks
    assert r0["results"] == r1["results"] and r0["results"]["episodes"] == 10
    # the same 10 episodes in one process give the same mean and CI
    model = tiny_model()
    model.load_state_dict(w0)
    dm = FewShotDataModule(**TINY, test_episodes=10)
    Trainer(**QUIET).test(model, dm, verbose=False)
    assert model.test_results["acc"] == pytest.approx(r0["results"]["acc"], abs=1e-6)
    assert model.test_results["acc_ci95"] == pytest.approx(r0["results"]["acc_ci95"], abs=1e-6)


# --- predict from a support folder ---------------------------------------------------------------
def write_digits(tmp_path: Path, classes=(0, 1, 2), shots=5, queries=4, size=64) -> dict[str, str]:
    """support/<digit>/*.png and query/*.png of real digit images; returns query file -> true class."""
    images, labels = load_digits_images(size)
    truth = {}
    for c in classes:
        idx = np.flatnonzero(labels == c)
        (tmp_path / "support" / str(c)).mkdir(parents=True)
        for k, i in enumerate(idx[:shots]):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(
                tmp_path / "support" / str(c) / f"{k}.png"
            )
        (tmp_path / "query").mkdir(exist_ok=True)
        for k, i in enumerate(idx[shots : shots + queries]):
            path = tmp_path / "query" / f"{c}_{k}.png"
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(path)
            truth[str(path)] = str(c)
    return truth


def test_predict_few_shot_with_pretrained_backbone_on_real_images(tmp_path):
    truth = write_digits(tmp_path)
    (tmp_path / "query" / "broken.png").write_bytes(b"not an image")
    preds = predict_few_shot(
        "efficientnet_lite0", tmp_path / "support", tmp_path / "query", image_size=64
    )
    assert sorted(p.path for p in preds) == sorted(truth)  # the broken file is skipped
    assert all(0 < p.probability <= 1 for p in preds)
    correct = sum(p.class_name == truth[p.path] for p in preds)
    assert correct / len(preds) > 0.6  # 3 classes: chance is 1/3


def test_predict_recovers_the_support_images_themselves(tmp_path):
    write_digits(tmp_path, shots=1, queries=0, size=16)
    for c in (0, 1, 2):  # queries identical to the single shot: distance 0 to their own prototype
        (tmp_path / "query" / f"{c}.png").write_bytes(
            (tmp_path / "support" / str(c) / "0.png").read_bytes()
        )
    model = tiny_model()
    preds = predict_few_shot(model, tmp_path / "support", tmp_path / "query")
    assert {Path(p.path).stem: p.class_name for p in preds} == {"0": "0", "1": "1", "2": "2"}
    assert model.training  # the mode is restored


def test_predict_through_the_cli_writes_csv(tmp_path, monkeypatch):
    truth = write_digits(tmp_path, shots=3, queries=2, size=16)
    monkeypatch.chdir(tmp_path)
    run_cli(
        [
            "predict",
            "--model=tl_lightning.modules.protonet.ProtoNetModule",
            "--model.backbone=conv4",
            "--model.freeze_backbone=true",
            "--data=tl_lightning.data.few_shot_predict.FewShotPredictDataModule",
            f"--data.support_dir={tmp_path / 'support'}",
            f"--data.query_dir={tmp_path / 'query'}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,class,probability" and len(rows) == 1 + len(truth)
    assert {r.split(",")[1] for r in rows[1:]} <= {"0", "1", "2"}


def test_predict_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="support folder"):
        predict_few_shot(tiny_model(), tmp_path / "nope", tmp_path)
    (tmp_path / "support" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match=">= 2 class sub-folders"):
        predict_few_shot(tiny_model(), tmp_path / "support", tmp_path)


# --- configs -------------------------------------------------------------------------------------
def test_digits_config_fits_under_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_5way.yaml"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--data.init_args.query=3",
        ]
    )
    assert isinstance(cli.model, ProtoNetModule) and cli.model.hparams.num_classes == 5
    assert cli.datamodule.hparams.backbone == "conv4"
    assert "val/acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize("name", ["digits_5way.yaml", "flowers102_5way_5shot.yaml"])
def test_configs_print_config_round_trips(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = print_config(["fit", "--config", str(CONFIGS / name)], capsys)
    (tmp_path / "printed.yaml").write_text(first)
    assert print_config(["fit", "--config", str(tmp_path / "printed.yaml")], capsys) == first


def test_flowers_config_stores_a_disjoint_62_20_20_class_split():
    import yaml

    data = yaml.safe_load((CONFIGS / "flowers102_5way_5shot.yaml").read_text())["data"]["init_args"]
    splits = [set(data[f"{k}_classes"]) for k in ("train", "val", "test")]
    assert [len(s) for s in splits] == [62, 20, 20]
    assert set.union(*splits) == set(range(102))
    dm = FewShotDataModule(
        Flowers102Source(**data["source"]["init_args"]),
        **{k: data[k] for k in ("train_classes", "val_classes", "test_classes")},
    )
    assert dm.class_splits() == FewShotDataModule("flowers102", backbone="conv4").class_splits()
