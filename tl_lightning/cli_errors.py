"""CLI error messages: a one-line diagnosis naming the bad key and the closest valid names.

:class:`ConfigErrorParser` is the CLI's parser; it puts the diagnosis ("unknown option
'head_dropuot' for FeatureExtractionModule; did you mean 'head_dropout'?") on top of
jsonargparse's error.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

from lightning.pytorch.cli import LightningArgumentParser

from tl_lightning.errors import did_you_mean

_UNKNOWN_OPTION = re.compile(r"Option '([\w.]+)' is not accepted")
_UNKNOWN_TOP = re.compile(r"does not accept option '([\w.]+)'")
_CLASS_PATH = re.compile(r"class_path[ =]'([\w.]+)'")
_WRONG_TYPE = re.compile(r'Parser key "([\w.]+)":\s*Expected a <class \'(\w+)\'>\. Got value: (.*)')
_NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")


def init_parameters(class_path: str) -> list[str]:
    """Constructor argument names of ``class_path`` (following ``**kwargs`` up the MRO)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names += [
            p.name
            for p in params
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return list(dict.fromkeys(names))


def explain_parse_error(message: str, top_level_keys: list[str] | None = None) -> str:
    """One line per recognised mistake in a jsonargparse error, with the closest valid names."""
    hints = []
    class_paths = list(dict.fromkeys(_CLASS_PATH.findall(message)))
    for option in dict.fromkeys(_UNKNOWN_OPTION.findall(message)):
        owners = [(cp, init_parameters(cp)) for cp in class_paths]
        owners = [(cp, ps) for cp, ps in owners if ps and option not in ps]
        best = max(
            owners,
            key=lambda o: max(
                (difflib.SequenceMatcher(None, option, p).ratio() for p in o[1]), default=0
            ),
            default=None,
        )
        if best is None:
            hints.append(f"unknown option '{option}'; remove it or fix its spelling")
            continue
        cp, params = best
        hints.append(
            f"unknown option '{option}' for {cp}; {did_you_mean(option, params, cutoff=0.5)}"
            f"valid options: {', '.join(params)}"
        )
    for key in dict.fromkeys(_UNKNOWN_TOP.findall(message)):
        head = key.split(".")[0]
        choices = top_level_keys or []
        hints.append(
            f"unknown key '{head}'; {did_you_mean(head, choices, cutoff=0.5)}"
            + (f"valid top-level keys: {', '.join(choices)}" if choices else "")
        )
    for key, typ, value in _WRONG_TYPE.findall(message):
        hints.append(f"'{key}' must be {typ}, got {value.strip()!r}; fix the value in your config")
    for module_name, attr in _NO_ATTRIBUTE.findall(message):
        try:
            names = [n for n in dir(importlib.import_module(module_name)) if not n.startswith("_")]
        except ImportError:
            names = []
        hints.append(f"no class '{attr}' in {module_name}; {did_you_mean(attr, names, cutoff=0.5)}".rstrip())
    return "\n".join(hints)


class ConfigErrorParser(LightningArgumentParser):
    """The CLI's argument parser: puts a diagnosis naming the bad key and the fix on top of errors."""

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        keys = sorted(
            {a.dest.split(".")[0] for a in parser._actions if a.dest not in ("help", "config")}
        )
        # nested class parsers raise (exit_on_error off) into the top one: diagnose only there
        hint = explain_parse_error(message, keys) if self.exit_on_error else ""
        if hint:
            message = f"{hint}\n(details below; `--help` lists every key)\n{message}"
        return super().error(message, ex)

