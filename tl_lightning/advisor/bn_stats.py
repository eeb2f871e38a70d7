"""BatchNorm input statistics gathered during a forward pass the caller makes anyway.

:class:`BatchNormInputs` hooks every BatchNorm layer of a network (forward pre-hooks) and
accumulates the per-channel mean and variance of what goes into it, batch by batch, while the
network runs. ``advise`` wraps its embedding pass in it, so the BN statistics of the whole
training split cost no pass of their own. Each batch adds its per-channel sums of ``x - ref`` and
``(x - ref)^2`` (``ref``: the layer's running mean, so the squares do not cancel) to float64
totals, so the result is the mean and population variance over every value seen, whatever the
batch sizes.

Example::

    with BatchNormInputs(backbone) as bn:
        for x in batches:
            backbone(x)
    shift = bn.shift()          # 0: these images look like the pretraining data to every BN layer
    bn.save(folder / "bn_input_stats.npz")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from tl_lightning.file_io import atomic_write

BN_STATS_FILE = "bn_input_stats.npz"  # beside the cached features it was measured with


def batchnorm_layers(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{name: layer}`` of every BatchNorm layer of ``module``, in module order."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


class BatchNormInputs:
    """Per-channel ``(count, mean, var)`` of each BatchNorm layer's input over the forward passes
    run inside the ``with`` block (population variance; float64)."""

    def __init__(self, module: nn.Module):
        self.layers = batchnorm_layers(module)
        # name -> [count, sum(x - ref), sum((x - ref)^2), ref] per channel, float64 across
        # batches; ref (the layer's running mean) keeps the squares from cancelling
        self._acc: dict[str, list] = {}
        self._handles: list = []

    def __enter__(self) -> BatchNormInputs:
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, name: str):
        def hook(module, args):
            if module.training and module.track_running_stats:
                raise RuntimeError(
                    f"BatchNorm layer '{name}' is in train mode: its running statistics would "
                    "move during the measurement; put the network in eval mode first"
                )
            x = args[0].detach()
            # channels last: a view for a channels-last input (the fast layout), where a
            # reduction over the other axes costs 10x more (torch.var_mean, measured); then
            # in place: a third of the time of out-of-place ops (measured)
            centred = x.movedim(1, -1).reshape(-1, x.shape[1]).to(torch.float32, copy=True)
            ref = module.running_mean
            ref = torch.zeros_like(centred[0]) if ref is None else ref.detach().float()
            centred -= ref
            s1 = centred.sum(0)
            self._add(name, centred.shape[0], s1, centred.square_().sum(0), ref)

        return hook

    def _add(self, name, n: int, s1: torch.Tensor, s2: torch.Tensor, ref: torch.Tensor) -> None:
        # totals stay on the input's device: no host synchronisation per layer and batch
        s1, s2 = s1.double(), s2.double()
        acc = self._acc.get(name)
        if acc is None:
            self._acc[name] = [n, s1, s2, ref.double()]
            return
        acc[0] += n
        acc[1] += s1
        acc[2] += s2

    @property
    def seen(self) -> bool:
        """Whether any forward pass went through a hooked layer."""
        return bool(self._acc)

    def moments(self) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
        """``{layer name: (values per channel, mean, population variance)}`` (float64)."""
        out = {}
        for name, (n, s1, s2, ref) in self._acc.items():
            s1, s2, ref = s1.cpu(), s2.cpu(), ref.cpu()
            d = s1 / n
            out[name] = (n, ref + d, (s2 / n - d * d).clamp(min=0))
        return out

    def shift(self) -> float:
        """Mean over BN layers and channels of ``|mu - mu_run| / sd_run + |log(sd / sd_run)|``:
        how far these inputs are from each layer's pretrained running statistics, in running
        standard deviations (0: no further than the pretraining data on average)."""
        if not self.layers:
            return 0.0
        if not self.seen:
            raise RuntimeError("no forward pass ran inside BatchNormInputs: nothing was measured")
        shifts = []
        for name, (_, mean, var) in self.moments().items():
            m = self.layers[name]
            sd_run = (m.running_var.double().cpu() + m.eps).sqrt()
            sd = (var + m.eps).sqrt()
            mu_run = m.running_mean.double().cpu()
            shifts.append(((mean - mu_run).abs() / sd_run + (sd / sd_run).log().abs()).mean())
        return float(torch.stack(shifts).mean())

    def save(self, path: str | Path) -> Path:
        """Write the accumulated statistics (atomically) for :meth:`load`."""
        arrays = {}
        for name, (n, s1, s2, ref) in self._acc.items():
            arrays[f"{name}|count"] = np.array(n, dtype=np.int64)
            arrays[f"{name}|s1"], arrays[f"{name}|s2"] = s1.cpu().numpy(), s2.cpu().numpy()
            arrays[f"{name}|ref"] = ref.cpu().numpy()
        return atomic_write(path, lambda f: np.savez(f, **arrays), "BatchNorm statistics")

    def load(self, path: str | Path) -> bool:
        """Replace the statistics by those saved at ``path``; ``False`` (nothing loaded) when the
        file is absent or does not name exactly this network's BatchNorm layers."""
        path = Path(path)
        if not path.is_file():
            return False
        with np.load(path, allow_pickle=False) as saved:
            names = {key.rsplit("|", 1)[0] for key in saved.files}
            if names != set(self.layers):
                return False
            self._acc = {
                name: [
                    int(saved[f"{name}|count"]),
                    *(torch.from_numpy(saved[f"{name}|{part}"]) for part in ("s1", "s2", "ref")),
                ]
                for name in self.layers
            }
        return True
