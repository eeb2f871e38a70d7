"""The one Backbone contract every pretrained network is wrapped in."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch
from torch import nn


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing the backbone was pretrained with (one source of truth for the datamodules)."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 224
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    fixed_input_size: bool = False  # True where the network only takes input_size (ViT)

    def as_dict(self) -> dict:
        return asdict(self)


class BNPolicy(str, Enum):
    """The one BatchNorm vocabulary: what the BatchNorm layers a ``bn`` setting governs do.

    Every module and callback with a ``bn`` argument takes these values with this meaning:
    FineTuneModule, DANNModule and GradualUnfreezing for the BN layers of *frozen* groups,
    ProtoNetModule for every BN layer of the backbone it trains episodically.

    - ``eval``: running statistics fixed and affine parameters frozen (a truly frozen layer).
    - ``train``: statistics keep updating and affine parameters train (fastai's ``train_bn``).
    - ``affine``: statistics fixed, affine parameters train.
    - ``stats``: statistics keep updating, affine parameters frozen (adapts the normalisation to
      a new domain with no backward pass through the frozen layers).
    - ``auto``: the weights decide: ``affine`` for pretrained weights (keep their statistics),
      ``train`` for random init (its statistics mean nothing).

    Example:
        >>> BNPolicy.parse("auto").resolve(pretrained=False)
        <BNPolicy.TRAIN: 'train'>
    """

    EVAL = "eval"
    TRAIN = "train"
    AFFINE = "affine"
    STATS = "stats"
    AUTO = "auto"

    @property
    def updates_statistics(self) -> bool:
        """Whether the running statistics move in training (BN layer in train mode)."""
        return self in (BNPolicy.TRAIN, BNPolicy.STATS)

    @property
    def trains_affine(self) -> bool:
        """Whether the affine weight and bias train."""
        return self in (BNPolicy.TRAIN, BNPolicy.AFFINE)

    def resolve(self, pretrained: bool) -> BNPolicy:
        """``auto`` made concrete for weights that are (or are not) pretrained; others unchanged."""
        if self is BNPolicy.AUTO:
            return BNPolicy.AFFINE if pretrained else BNPolicy.TRAIN
        return self

    @classmethod
    def parse(cls, value: str | BNPolicy, owner: str = "") -> BNPolicy:
        """``value`` as a policy; a spelling ``owner`` accepted before the one vocabulary warns
        (``FutureWarning``, for one release) and maps to its new name; anything else is an error."""
        old = OLD_BN_SPELLINGS.get(owner, {}).get(value) if isinstance(value, str) else None
        if old is not None:
            warnings.warn(
                f"{owner} bn: {value!r} is deprecated: it means {old.value!r} (BatchNorm statistics "
                f"fixed, affine parameters train); write bn: {old.value}. In the next release "
                f"{value!r} will mean what it means everywhere else ({BNPolicy(value).meaning})",
                FutureWarning,
                stacklevel=3,
            )
            return old
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown bn '{value}'; valid: {', '.join(BN_POLICIES)}") from None

    @property
    def meaning(self) -> str:
        """The policy in words."""
        return _BN_MEANING[self]


_BN_MEANING = {
    BNPolicy.EVAL: "statistics fixed, affine frozen",
    BNPolicy.TRAIN: "statistics update, affine trains",
    BNPolicy.AFFINE: "statistics fixed, affine trains",
    BNPolicy.STATS: "statistics update, affine frozen",
    BNPolicy.AUTO: "affine for pretrained weights, train for random init",
}
BN_POLICIES = tuple(p.value for p in BNPolicy)  # the one BatchNorm vocabulary
# Spellings a module took before the one vocabulary, per module: {old: new}. They keep working,
# with a FutureWarning, for one release (ProtoNetModule's ``eval`` kept the statistics but
# trained the affine parameters: ``affine`` here).
OLD_BN_SPELLINGS: dict[str, dict[str, BNPolicy]] = {"ProtoNetModule": {"eval": BNPolicy.AFFINE}}


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class LayerGroup:
    """A named, ordered slice of a backbone: the unit of freezing and of per-group learning rates."""

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    batchnorms: dict[str, nn.Module] = field(default_factory=dict)  # qualified name -> BN layer

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params)


def group_by_prefixes(
    model: nn.Module, spec: Sequence[tuple[str, Sequence[str]]]
) -> list[LayerGroup]:
    """Split ``model`` into groups by parameter-name prefixes; each parameter lands in one group.

    Parameters matching no prefix join the nearest earlier group (or the first one), so a group
    spec can never silently leave weights outside every group.
    """
    groups = [LayerGroup(name) for name, _ in spec]
    owner: dict[str, int] = {}
    for name, _ in model.named_parameters():
        idx = next(
            (
                i
                for i, (_, prefixes) in enumerate(spec)
                for p in prefixes
                if name == p or name.startswith(p + ".")
            ),
            None,
        )
        owner[name] = idx if idx is not None else (max(owner.values()) if owner else 0)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:  # tied weights belong to the first group that names them
            seen.add(id(p))
            groups[owner[name]].params.append(p)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _BN_TYPES) and mod.weight is not None:
            groups[owner[f"{mod_name}.weight"]].batchnorms[mod_name] = mod
        elif isinstance(mod, _BN_TYPES):  # affine=False: attach by name prefix
            idx = next(
                (
                    i
                    for i, (_, prefixes) in enumerate(spec)
                    for p in prefixes
                    if mod_name == p or mod_name.startswith(p + ".")
                ),
                0,
            )
            groups[idx].batchnorms[mod_name] = mod
    return [g for g in groups if g.params]


class Backbone(nn.Module):
    """A pretrained network without its classifier: images ``[B, 3, H, W]`` -> features ``[B, D]``.

    Whatever library built it (torchvision, timm, our own), a backbone offers the same contract:
    ``feature_dim``, ``data_config`` (preprocessing), ordered ``layer_groups()`` from input to
    output, and ``freeze`` / ``unfreeze`` with an explicit BatchNorm policy that survives
    ``model.train()``.

    Example:
        >>> from tl_lightning import build_backbone
        >>> bb = build_backbone("efficientnet_lite0")          # offline ImageNet weights
        >>> bb(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 1280])
        >>> [g.name for g in bb.layer_groups()][:3]
        ['stem', 'blocks.0', 'blocks.1']
        >>> bb.freeze(bn="eval")                                 # a fixed feature extractor
    """

    pretrained: bool = True  # False when built with random init (its BN statistics mean nothing)

    def __init__(
        self,
        body: nn.Module,
        data_config: DataConfig,
        group_spec: Sequence[tuple[str, Sequence[str]]],
        name: str = "",
        pool: str = "auto",
    ):
        super().__init__()
        self.body = body
        self.name = name
        self.data_config = data_config
        self._group_spec = [(n, list(p)) for n, p in group_spec]
        self._pool = pool
        self._bn_policy: dict[str, BNPolicy] = {}  # BN layer name -> policy (frozen groups, keep_bn_statistics)
        self.feature_dim = self._probe_feature_dim()

    # --- features -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if isinstance(out, dict):  # create_feature_extractor returns {name: tensor}
            out = next(iter(out.values()))
        return _pool(out, self._pool)

    @torch.no_grad()
    def _probe_feature_dim(self) -> int:
        was_training = self.training
        self.eval()
        size = self.data_config.input_size if self.data_config.fixed_input_size else 64
        dim = self(torch.zeros(1, 3, size, size)).shape[-1]
        self.train(was_training)
        self.probed_size = size  # the input size known to work: checks need not probe again
        return int(dim)

    # --- groups -----------------------------------------------------------------------------
    def layer_groups(self) -> list[LayerGroup]:
        """Ordered groups, input side first (e.g. ``stem, layer1, ..., layer4``)."""
        return group_by_prefixes(self.body, self._group_spec)

    def group_names(self) -> list[str]:
        return [g.name for g in self.layer_groups()]

    def select_groups(self, selectors: Iterable[str] | None) -> list[LayerGroup]:
        """Groups whose name equals or fully matches one of ``selectors`` (regexes); None = all."""
        groups = self.layer_groups()
        if selectors is None:
            return groups
        selectors = list(selectors)
        chosen = [g for g in groups if any(s == g.name or re.fullmatch(s, g.name) for s in selectors)]
        unmatched = [s for s in selectors if not any(s == g.name or re.fullmatch(s, g.name) for g in groups)]
        if unmatched:
            raise ValueError(
                f"layer group(s) {unmatched} not found in backbone '{self.name}'; "
                f"its groups are {[g.name for g in groups]}"
            )
        return chosen

    # --- freezing ---------------------------------------------------------------------------
    def freeze(self, groups: Iterable[str] | None = None, bn: str | BNPolicy = "eval") -> None:
        """Freeze ``groups`` (all by default) with BatchNorm policy ``bn`` (see :class:`BNPolicy`)."""
        policy = BNPolicy.parse(bn)  # before any change: a bad name leaves the backbone as it was
        for g in self.select_groups(groups):
            for p in g.params:
                p.requires_grad_(False)
        self.set_bn_policy(policy, groups)

    def set_bn_policy(self, bn: str | BNPolicy, groups: Iterable[str] | None = None) -> None:
        """BatchNorm layers of ``groups`` (all by default) follow ``bn``, whatever the other
        parameters do; ``auto`` resolves by :attr:`pretrained`. Survives ``.train()``."""
        policy = BNPolicy.parse(bn).resolve(self.pretrained)
        for g in self.select_groups(groups):
            for name, m in g.batchnorms.items():
                self._bn_policy[name] = policy
                for p in m.parameters(recurse=False):
                    p.requires_grad_(policy.trains_affine)
                if policy.updates_statistics:
                    m.train(self.training)
        self._apply_bn_policy()

    def unfreeze(self, groups: Iterable[str] | None = None) -> None:
        """Make ``groups`` (all by default) trainable again, BatchNorm included."""
        for g in self.select_groups(groups):
            for p in g.params:
                p.requires_grad_(True)
            for name, m in g.batchnorms.items():
                self._bn_policy.pop(name, None)
                m.train(self.training)

    def keep_bn_statistics(self) -> None:
        """Keep every BatchNorm's running statistics (eval mode, re-applied after ``.train()``).

        Parameters, BN affine included, still train: fine-tuning a pretrained network on small or
        narrow batches whose statistics would replace the pretrained ones. ``unfreeze`` of a group
        hands its BN layers back to batch statistics.
        """
        for name, m in self.body.named_modules():
            if isinstance(m, _BN_TYPES):
                self._bn_policy.setdefault(name, BNPolicy.AFFINE)
        self._apply_bn_policy()

    def frozen_group_names(self) -> list[str]:
        return [g.name for g in self.layer_groups() if not any(p.requires_grad for p in g.params)]

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        self._apply_bn_policy()
        return self

    def _apply_bn_policy(self) -> None:
        # Re-applied after every .train(): Lightning calls model.train() each epoch (Lightning #15062).
        for name, m in self.body.named_modules():
            policy = self._bn_policy.get(name)
            if policy in (BNPolicy.EVAL, BNPolicy.AFFINE):
                m.eval()


def _pool(out: torch.Tensor, how: str) -> torch.Tensor:
    if out.ndim == 2:
        return out
    if out.ndim == 4:  # [B, C, H, W] -> global average pool
        return out.mean(dim=(2, 3))
    if out.ndim == 3:  # [B, N, C] transformer tokens -> class token (or mean when asked)
        return out.mean(dim=1) if how == "mean" else out[:, 0]
    raise ValueError(f"cannot pool backbone output of shape {tuple(out.shape)}")
