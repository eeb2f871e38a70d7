"""``tl-lightning advise --config my.yaml``: the advice from the command line, as a table."""

from __future__ import annotations

import argparse
import copy

import yaml

from tl_lightning.advisor.advise import Advice, advise
from tl_lightning.advisor.config import LINKED
from tl_lightning.advisor.rule import STRATEGIES, seeds_size_rule


def merge(base: dict, update: dict) -> dict:
    """Deep merge of config dicts, ``update`` winning (like repeated ``--config`` in ``fit``)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(config: dict, dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = yaml.safe_load(value)


def load_config(paths: list[str], overrides: list[str]) -> dict:
    """Merge YAML ``paths`` in order, then apply ``--a.b.c=value`` overrides."""
    config: dict = {}
    for path in paths:
        with open(path) as f:
            config = merge(config, yaml.safe_load(f) or {})
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep:
            raise SystemExit(f"advise: expected --key=value, got '{item}'")
        _set_dotted(config, key, value)
    if "data" not in config:
        raise SystemExit("advise: the config has no 'data' section; pass a datamodule config")
    return config


def instantiate_section(base: type, section: dict):
    """The object a ``{class_path, init_args}`` config section describes (a subclass of ``base``),
    built by jsonargparse as the CLI builds it."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "x")
    parsed = parser.parse_object({"x": section})
    # jsonargparse >= 4.49 renamed instantiate_classes (deprecated) to instantiate
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return build(parsed).x


def build_datamodule(config: dict):
    """The configured datamodule, with the model's backbone/weights (the CLI's link) applied."""
    from lightning.pytorch import LightningDataModule

    data = copy.deepcopy(config["data"])
    model_args = (config.get("model") or {}).get("init_args") or {}
    data.setdefault("init_args", {})
    for key in LINKED:
        if key in model_args:
            data["init_args"][key] = model_args[key]
    return instantiate_section(LightningDataModule, data)


def format_advice(advice: Advice) -> str:
    """The printed report: data, distance, timings, recommendation and its reasons."""
    d, dist, t, rec = advice.description, advice.distance, advice.timing, advice.recommendation
    lines = [
        "data",
        f"  images per split   {d.splits}",
        f"  train per class    {dict(zip(d.class_names, d.train_per_class, strict=True))}",
        f"  imbalance          {d.imbalance:.2f} (largest / smallest class)",
        f"  image sizes        {d.size_summary()}",
        f"  broken files       {len(d.broken)}"
        + "".join(f"\n    {p}: {why}" for p, why in d.broken[:10]),
        "distance from the pretraining",
        f"  linear probe       {dist.probe_acc:.3f} ({dist.folds}-fold, training split)",
        f"  k-NN               {dist.knn_acc:.3f}",
        f"  BatchNorm shift    {dist.bn_shift:.2f}",
        "seconds per epoch (measured on this machine)",
    ]
    lines += [f"  {s:20s} {t.epoch_seconds(s):8.1f}" for s in STRATEGIES]
    lines += [
        "recommendation",
        f"  strategy           {rec.strategy}"
        + (f" (last {rec.train_groups} groups)" if rec.train_groups else ""),
        f"  bn / lr / epochs   {rec.bn} / {rec.lr:.3g} / {rec.epochs}",
        f"  batch / precision  {rec.batch_size} / {rec.precision}",
        f"  (data size alone, the seeds' rule: {seeds_size_rule(d.num_train)})",
        "why",
    ]
    lines += [f"  {what:38s} {value:>12s}  {why}" for what, value, why in rec.reasons]
    parts = ", ".join(f"{name} {sec:.1f}" for name, sec in advice.phases.items())
    lines.append(f"advice took {advice.seconds:.1f} s ({parts})")
    if advice.config_path is not None:
        lines.append(
            f"wrote {advice.config_path}; run: tl-lightning fit --config {advice.config_path}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> Advice:
    """Parse ``advise`` arguments, run :func:`advise`, print the report; returns the advice."""
    parser = argparse.ArgumentParser(
        prog="tl-lightning advise",
        description="Recommend a transfer strategy for the configured data and write advised.yaml",
    )
    parser.add_argument(
        "--config", action="append", required=True, help="YAML config(s), merged in order"
    )
    parser.add_argument("--out", default="advised.yaml", help="where to write the advised config")
    parser.add_argument("--budget_minutes", type=float, default=10.0, help="training time to spend")
    parser.add_argument("--folds", type=int, default=5, help="k of the k-fold probe and k-NN")
    parser.add_argument(
        "--timing_batches", type=int, default=3, help="batches timed per strategy, at most"
    )
    parser.add_argument(
        "--lr_find", action="store_true", help="pick the LR with Lightning's lr_find"
    )
    parser.add_argument("--lr_find_steps", type=int, default=50, help="steps of the LR range test")
    parser.add_argument("--cache_dir", default=None, help="feature cache folder")
    args, overrides = parser.parse_known_args(argv)
    config = load_config(args.config, overrides)
    advice = advise(
        build_datamodule(config),
        budget_minutes=args.budget_minutes,
        folds=args.folds,
        timing_batches=args.timing_batches,
        lr_find=args.lr_find,
        lr_find_steps=args.lr_find_steps,
        out=args.out,
        trainer=config.get("trainer"),
        data=config["data"],
        cache_dir=args.cache_dir,
    )
    return advice
