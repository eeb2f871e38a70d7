"""Fine-tuning: train the backbone too, all of it or its last groups, with per-group learning rates."""

from __future__ import annotations

from tl_lightning.modules.base import ClassifierModule


class FineTuneModule(ClassifierModule):
    """Fine-tune a pretrained backbone with discriminative (per layer group) learning rates.

    Args:
        train_groups: train only the last N backbone layer groups (None: all of them). Earlier
            groups are frozen with BatchNorm policy ``bn`` (``eval``, ``train``, ``affine`` or ``stats``).
        lr_decay: LR multiplier applied once per *group* going from the head toward the input:
            the head trains at the base LR, the top group at ``base * lr_decay``, the next at
            ``base * lr_decay**2``... (the seeds decayed per parameter tensor, which shrinks
            early layers' LR to ~0 on deep nets).
        group_lrs: explicit LRs by group name (``{"layer4": 1e-4, "head": 1e-3}``); win over ``lr_decay``.
        bn: BatchNorm policy for frozen groups.

    Param groups are named ``head`` and ``backbone.<group>`` so LearningRateMonitor shows them.
    Fully frozen groups stay out of the optimizer unless ``include_frozen_groups`` is True (set
    by :class:`~tl_lightning.callbacks.unfreezing.GradualUnfreezing`, which needs every group
    in the optimizer from the start and gates the frozen ones itself).

    Example:
        >>> model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None, lr_decay=0.5)
        >>> [g["name"] for g in model.param_groups()]
        ['head', 'backbone.layer4', 'backbone.layer3', 'backbone.layer2', 'backbone.layer1', 'backbone.stem']
    """

    def __init__(
        self,
        *args,
        train_groups: int | None = None,
        lr_decay: float = 1.0,
        group_lrs: dict[str, float] | None = None,
        bn: str = "eval",
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.include_frozen_groups = False  # not a hyperparameter: a callback's contract
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        names = self.backbone.group_names()
        unknown = set(group_lrs or {}) - set(names) - {"head"}
        if unknown:
            raise ValueError(
                f"group_lrs names {sorted(unknown)} are not groups of {self.hparams.backbone}; valid: {['head', *names]}"
            )
        if train_groups is not None:
            if not 0 <= train_groups <= len(names):
                raise ValueError(
                    f"train_groups must be in 0..{len(names)} for {self.hparams.backbone}, got {train_groups}"
                )
            frozen = names[: len(names) - train_groups]
            if frozen:
                self.backbone.freeze(frozen, bn=bn)

    def param_groups(self) -> list[dict]:
        explicit = self.hparams.group_lrs or {}
        groups = [self._group("head", list(self.head.parameters()), 1.0, explicit)]
        for depth, group in enumerate(reversed(self.backbone.layer_groups()), start=1):
            params = (
                group.params
                if self.include_frozen_groups
                else [p for p in group.params if p.requires_grad]
            )
            if params:  # fully frozen groups stay out of the optimizer unless asked for
                groups.append(
                    self._group(
                        group.name, params, self.hparams.lr_decay**depth, explicit, "backbone."
                    )
                )
        return groups

    @staticmethod
    def _group(name: str, params: list, scale: float, explicit: dict, prefix: str = "") -> dict:
        group = {"name": prefix + name, "params": params}
        if name in explicit:
            group["lr"] = explicit[name]
        else:
            group["lr_scale"] = scale
        return group
