"""The advised config: the user's data section plus the recommended model and trainer, as YAML."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tl_lightning.advisor.rule import Recommendation

LINKED = ("backbone", "weights")  # set on the model; the CLI links them to the data


def advised_config(
    rec: Recommendation, data: dict, backbone: str, weights: str | None, trainer: dict | None = None
) -> dict:
    """A ``tl-lightning fit`` config for ``rec``.

    ``data`` is the user's ``data`` section (``class_path`` + ``init_args``): kept as is, except
    the batch size (advised) and backbone/weights (moved to the model, which the CLI links to
    the data). ``trainer`` keeps the user's trainer settings except epochs, precision and
    callbacks, which the advice sets.

    Example:
        >>> from tl_lightning.advisor.rule import Recommendation
        >>> rec = Recommendation("full_finetune", None, "stats", 12, 64, "32-true", 2e-3)
        >>> cfg = advised_config(rec, {"class_path": "tl_lightning.data.DigitsDataModule"}, "efficientnet_lite0", "DEFAULT")
        >>> cfg["model"]["class_path"], cfg["trainer"]["max_epochs"]
        ('tl_lightning.modules.FineTuneModule', 12)
    """
    data = copy.deepcopy(data)
    init = {k: v for k, v in (data.get("init_args") or {}).items() if k not in LINKED}
    init["batch_size"] = rec.batch_size
    data["init_args"] = init
    optimizer = {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": rec.lr, "weight_decay": 1e-4},
    }
    model_args: dict = {"backbone": backbone, "weights": weights, "optimizer": optimizer}
    callbacks = []
    if rec.strategy == "feature_extraction":
        model_class = "tl_lightning.modules.FeatureExtractionModule"
    else:
        model_class = "tl_lightning.modules.FineTuneModule"
        model_args["lr_scheduler"] = {"class_path": "tl_lightning.optim.OneCycleLR"}
        if rec.strategy == "last_groups":
            model_args["train_groups"] = rec.train_groups
            model_args["bn"] = rec.bn
        elif rec.strategy == "gradual_unfreezing":
            # fastai's fine_tune: one head-only epoch, then everything with discriminative LRs
            callbacks.append(
                {
                    "class_path": "tl_lightning.callbacks.unfreezing.GradualUnfreezing",
                    "init_args": {
                        "unfreeze_at_epoch": 1,
                        "lr_spread": 100,
                        "unfrozen_lr_scale": 0.5,
                        "restart_schedule": True,
                        "bn": rec.bn,
                    },
                }
            )
    skip = ("max_epochs", "max_steps", "max_time", "precision", "callbacks")
    trainer_cfg = {k: v for k, v in (trainer or {}).items() if k not in skip}
    trainer_cfg.update({"max_epochs": rec.epochs, "precision": rec.precision})
    if callbacks:
        trainer_cfg["callbacks"] = callbacks
    return {
        "seed_everything": 0,
        "model": {"class_path": model_class, "init_args": model_args},
        "data": data,
        "trainer": trainer_cfg,
    }


def write_config(config: dict, path: str | Path, reasons: list[tuple[str, str, str]] = ()) -> Path:
    """Write ``config`` as YAML, the reasons as a comment header; returns the path."""
    path = Path(path)
    header = ["# Written by `tl-lightning advise`. Run: tl-lightning fit --config " + path.name]
    header += [f"#   {what}: {value} -> {why}" for what, value, why in reasons]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)  # atomic: a killed run leaves the old file or the new one
    return path
