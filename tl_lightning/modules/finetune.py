"""Fine-tuning: train the backbone too, all of it or its last groups, with per-group learning rates."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tl_lightning.backbones.backbone import BNPolicy
from tl_lightning.backbones.registry import _skip_weights
from tl_lightning.backbones.source_head import source_classifier
from tl_lightning.forgetting import StartingPoint
from tl_lightning.modules.base import ClassifierModule
from tl_lightning.modules.probe_init import fit_head_with_probe
from tl_lightning.regularizers import head_penalty, l2sp_penalty, lwf_loss

INIT_HEADS = ("random", "probe")


def _loading_checkpoint() -> bool:
    """True inside ``load_from_checkpoint``: weights (source classifier included) come from the file."""
    return _skip_weights.get()


class FineTuneModule(ClassifierModule):
    """Fine-tune a pretrained backbone with discriminative (per layer group) learning rates.

    Args:
        train_groups: train only the last N backbone layer groups (None: all of them). Earlier
            groups are frozen with BatchNorm policy ``bn`` (``eval``, ``train``, ``affine``, ``stats``
            or ``auto``: the one vocabulary of :class:`~tl_lightning.backbones.BNPolicy`).
        lr_decay: LR multiplier applied once per *group* going from the head toward the input:
            the head trains at the base LR, the top group at ``base * lr_decay``, the next at
            ``base * lr_decay**2``... (the seeds decayed per parameter tensor, which shrinks
            early layers' LR to ~0 on deep nets).
        group_lrs: explicit LRs by group name (``{"layer4": 1e-4, "head": 1e-3}``); win over ``lr_decay``.
        bn: BatchNorm policy for frozen groups.
        init_head: ``random`` (default) or ``probe``: LP-FT (Kumar et al. 2022), the head is first
            fitted by the cached L-BFGS linear probe on the starting features (train split, its
            L2 chosen on the val split), then everything fine-tunes from there.
        l2sp_alpha, l2sp_beta: L2-SP (Li et al. 2018): ``alpha/2 ||w - w0||^2`` on the backbone
            toward its starting weights, ``beta/2 ||w_head||^2`` on the new head. Paper: alpha
            0.01-0.1, beta 0.01. Logged as ``train/l2sp`` and ``train/l2sp_head``. 0 = off.
        lwf_alpha, lwf_temperature: LwF (Li & Hoiem 2016): distil the starting network's source
            predictions (softened by T) through the kept source classifier. Paper: alpha 1, T 2.
            Logged as ``train/lwf``; needs a backbone with its pretraining classifier.
        track_forgetting: keep the frozen starting point (``self.start``) for
            :class:`~tl_lightning.callbacks.ForgettingMonitor` and WiSE-FT even without a regulariser.
        keep_bn_statistics: keep every BatchNorm's pretrained running statistics (eval mode; affine
            weights still train). Re-estimating them on the target data alone erases the source task:
            4 batches of digits through EfficientNet-Lite0 in train mode, no weight changed, drop
            source agreement from 1.0 to 0.22; L2-SP and LwF act on weights and outputs, not on them.
            The robust configs of L2-SP, LwF, LP-FT and WiSE-FT set it (README, Forgetting).

    ``train/loss`` stays the task loss (comparable across methods); with a regulariser on,
    ``train/total_loss`` is what the optimizer minimises. The starting point (backbone, head,
    source classifier) is kept frozen in ``self.start`` whenever something needs it, and saved in
    checkpoints so a resumed run keeps its true starting point.

    Param groups are named ``head`` and ``backbone.<group>`` so LearningRateMonitor shows them.
    Fully frozen groups stay out of the optimizer unless ``include_frozen_groups`` is True (set
    by :class:`~tl_lightning.callbacks.unfreezing.GradualUnfreezing`, which needs every group
    in the optimizer from the start and gates the frozen ones itself).

    Example:
        >>> model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None, lr_decay=0.5)
        >>> [g["name"] for g in model.param_groups()]
        ['head', 'backbone.layer4', 'backbone.layer3', 'backbone.layer2', 'backbone.layer1', 'backbone.stem']
        >>> lpft = FineTuneModule(num_classes=10, init_head="probe", l2sp_alpha=0.01)   # LP-FT + L2-SP
    """

    def __init__(
        self,
        *args,
        train_groups: int | None = None,
        lr_decay: float = 1.0,
        group_lrs: dict[str, float] | None = None,
        bn: str = "eval",
        init_head: str = "random",
        l2sp_alpha: float = 0.0,
        l2sp_beta: float = 0.0,
        lwf_alpha: float = 0.0,
        lwf_temperature: float = 2.0,
        track_forgetting: bool = False,
        keep_bn_statistics: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        BNPolicy.parse(bn)  # a clear error even when no group is frozen yet
        self.include_frozen_groups = False  # not a hyperparameter: a callback's contract
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if init_head not in INIT_HEADS:
            raise ValueError(f"init_head must be one of {list(INIT_HEADS)}, got '{init_head}'")
        if init_head == "probe" and self.hparams.head != "linear":
            raise ValueError(f"init_head: probe fits a linear head; got head: {self.hparams.head} (use head: linear)")
        for name in ("l2sp_alpha", "l2sp_beta", "lwf_alpha"):
            if self.hparams[name] < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {self.hparams[name]}")
        if lwf_temperature <= 0:
            raise ValueError(f"lwf_temperature must be > 0, got {lwf_temperature}")
        names = self.backbone.group_names()
        unknown = set(group_lrs or {}) - set(names) - {"head"}
        if unknown:
            raise ValueError(
                f"group_lrs names {sorted(unknown)} are not groups of {self.hparams.backbone}; valid: {['head', *names]}"
            )
        # the starting point, copied before any freezing or training touches the backbone
        self.start: StartingPoint | None = None
        if track_forgetting or l2sp_alpha > 0 or lwf_alpha > 0 or init_head == "probe":
            self.keep_start()
        if lwf_alpha > 0 and self.start.source_head is None and not _loading_checkpoint():
            raise ValueError(
                f"lwf_alpha needs the backbone's pretraining classifier, and '{self.hparams.backbone}' "
                f"with weights={self.hparams.weights!r} has none (random init, a weights file or a "
                f"cut layer); use L2-SP (l2sp_alpha) instead"
            )
        if keep_bn_statistics:  # BN statistics are part of the starting point too (see README)
            self.backbone.keep_bn_statistics()
        self.register_buffer("head_from_probe", torch.zeros((), dtype=torch.bool))
        self.probe_result = None  # the LP stage's ProbeResult, once fitted
        self._keep_features = False
        self._features = None
        if train_groups is not None:
            if not 0 <= train_groups <= len(names):
                raise ValueError(
                    f"train_groups must be in 0..{len(names)} for {self.hparams.backbone}, got {train_groups}"
                )
            frozen = names[: len(names) - train_groups]
            if frozen:
                self.backbone.freeze(frozen, bn=bn)

    # --- the starting point ------------------------------------------------------------------
    def keep_start(self) -> StartingPoint:
        """Keep a frozen copy of the current backbone and head, with the source classifier if any.

        Done at construction when a regulariser, ``track_forgetting`` or LP-FT needs it; the copy
        is part of the checkpoint (about as large as the model again), so a resumed run keeps its
        true starting point.
        """
        if self.start is None:
            hp = self.hparams
            source = None if _loading_checkpoint() else source_classifier(hp.backbone, hp.weights, hp.layer)
            self.start = StartingPoint(self.backbone, self.head, source)
        return self.start

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # rebuild what the checkpoint holds before Lightning loads its state dict into us
        state = checkpoint.get("state_dict", {})
        if any(k.startswith("start.") for k in state):
            start = self.keep_start()
            w = state.get("start.source_head.weight")
            if w is not None and start.source_head is None:
                start.source_head = nn.Linear(w.shape[1], w.shape[0]).requires_grad_(False)

    # --- training ------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = super().features(x)
        if self._keep_features:  # the training step's features, for LwF's source classifier
            self._features = f
        return f

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        self._keep_features = hp.lwf_alpha > 0
        try:
            loss = super().training_step(batch, batch_idx)  # task loss, logged as train/loss
            features, self._features = self._features, None
        finally:
            self._keep_features = False
        terms = {}
        if hp.l2sp_alpha > 0:
            pairs = [(p, p0) for p, p0 in zip(self.backbone.parameters(), self.start.backbone.parameters()) if p.requires_grad]
            if pairs:  # a fully frozen backbone (GradualUnfreezing's first phase) has nothing to pull
                terms["l2sp"] = l2sp_penalty(*zip(*pairs), alpha=hp.l2sp_alpha)
        if hp.l2sp_beta > 0:
            terms["l2sp_head"] = head_penalty(self.head.parameters(), hp.l2sp_beta)
        if hp.lwf_alpha > 0:
            x = batch[0]
            if self.hparams.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            teacher = self.start.source_logits(x)
            student = self.start.source_head(features)
            terms["lwf"] = hp.lwf_alpha * lwf_loss(student, teacher, hp.lwf_temperature)
        if not terms:
            return loss
        total = loss + sum(terms.values())
        for name, value in {**terms, "total_loss": total}.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=len(batch[0]), sync_dist=True)
        return total

    def on_fit_start(self) -> None:
        if self.hparams.init_head == "probe" and not bool(self.head_from_probe):
            # LP-FT's first stage; skipped on resume (the flag is in the checkpoint)
            self.probe_result = fit_head_with_probe(self)
            self.head_from_probe.fill_(True)
            self.start.head.load_state_dict(self.head.state_dict())  # WiSE-FT's start: the probe's head

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
