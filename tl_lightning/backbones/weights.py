"""Load weights from local files without ever executing code from them."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tl_lightning.errors import UnsafeFileError, WeightsUnavailableError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_PREFIXES = ("", "body.", "backbone.body.", "module.", "model.", "backbone.")


def looks_like_path(weights: str | None) -> bool:
    return bool(weights) and (
        weights.endswith(WEIGHT_SUFFIXES) or "/" in weights or "\\" in weights or Path(weights).is_file()
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, refusing pickled code.

    Torch files are read with ``torch.load(weights_only=True)``: tensors and plain containers
    only, so a crafted checkpoint cannot run code. A Lightning checkpoint's ``state_dict`` is used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"refusing to load '{path}': it contains pickled Python objects beyond tensors, which "
            f"could run code. Re-save it as a plain state dict or as .safetensors. ({e})"
        ) from None
    except Exception as e:  # truncated or not a torch file at all
        raise WeightsUnavailableError(f"cannot read weights file '{path}': {e}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"'{path}' does not hold a state dict of tensors")
    return dict(obj)


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, stripping a common key prefix; the two must really match.

    Every model tensor must be found with its shape; the file may hold one extra layer (the old
    classifier, dropped with the head). Anything else means another architecture: an error, so
    wrong weights never load half-way in silence.
    """
    own = model.state_dict()
    prefix = max(_PREFIXES, key=lambda pre: sum(k[len(pre) :] in own for k in state if k.startswith(pre)))
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    found = {k: v for k, v in mine.items() if k in own}
    if not found:
        raise WeightsUnavailableError(
            f"no tensor in '{source}' matches the model's parameter names "
            f"(model expects e.g. {list(own)[:3]}, file has e.g. {list(state)[:3]})"
        )
    wrong = [k for k, v in found.items() if v.shape != own[k].shape]
    missing = [k for k in own if k not in found and not k.endswith("num_batches_tracked")]
    extra_layers = sorted({k.rsplit(".", 1)[0] for k in mine if k not in own})
    if wrong or missing or len(extra_layers) > 1:
        raise WeightsUnavailableError(
            f"weights '{source}' do not fit this architecture: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra_layers)} extra layers (e.g. {extra_layers[:3]}), {len(wrong)} mis-shaped (e.g. "
            + ", ".join(f"{k} {tuple(found[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3])
            + ")"
        )
    model.load_state_dict(found, strict=False)
    if extra_layers:
        log.info("loaded %d tensors from %s; dropped the old classifier %s", len(found), source, extra_layers[0])
