"""Gradual unfreezing of a backbone, top group first, with discriminative LRs that survive resume."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau

from tl_lightning.backbones.backbone import Backbone, BNPolicy
from tl_lightning.optim import make_scheduler

# Frozen BatchNorm layers sit in eval mode on purpose; Lightning's fit-start warning is noise here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


class GradualUnfreezing(Callback):
    """Unfreeze a module's ``backbone`` layer groups on a schedule; every param group exists from the start.

    Give one schedule: ``unfreeze_at_epoch`` (everything at once: the two-phase recipe),
    ``every_n_epochs`` (the next group from the top every n epochs) or ``milestones``
    (``{epoch: [group names or regexes]}``). With none, everything unfreezes at epoch 1.

    What it gets right where Lightning's ``BackboneFinetuning`` does not:

    - the optimizer holds every group from the start, named ``head`` / ``backbone.<group>``;
      frozen ones sit at lr 0 (``requires_grad=False``), so schedulers, LearningRateMonitor and
      checkpoints always see the same groups (Lightning #8720, #20194);
    - the frozen/unfrozen state and every LR are recomputed from the epoch and step alone, at
      fit start and at each epoch start, so resuming mid-phase is exact (#21901);
    - a scheduler's per-group base LRs move with the group (``base_lrs``/``initial_lr``,
      OneCycle's ``max_lr``, ReduceLROnPlateau's ``min_lrs``);
    - frozen BatchNorm layers follow ``bn`` and stay that way after every ``model.train()`` (#15062);
    - under DDP (``ddp_safe``, the default there) frozen params keep ``requires_grad=True`` so DDP
      syncs them once they unfreeze, and their gradients are dropped before each step (#20340);
    - while the backbone is frozen no autograd graph is built through it: a frozen epoch costs
      about what a feature-extraction epoch costs.

    Args:
        unfreeze_at_epoch: unfreeze all groups at this epoch.
        every_n_epochs: unfreeze one more group from the top at epochs n, 2n, 3n...
        milestones: ``{epoch: [group names or regexes]}``, e.g. ``{5: [layer4], 10: [".*"]}``.
        lr_ratio: LR of the top backbone group as a fraction of the head LR (None: keep the LR
            the module gave the group, e.g. FineTuneModule's ``lr_decay``/``group_lrs``).
        lr_decay: with ``lr_ratio``, multiply once more per group toward the input.
        lr_spread: fastai's ``slice(lr / spread, lr)``: LRs fall geometrically from the head LR to
            head LR / ``lr_spread`` at the input-most group (sets ``lr_ratio`` and ``lr_decay``).
        group_lrs: explicit LRs by group name or regex; win over the above.
        unfrozen_lr_scale: multiplies every LR, head included, once the first group unfreezes
            (fastai's ``fine_tune`` halves: 0.5).
        warmup_steps: ramp a newly unfrozen group's LR linearly from 0 over this many steps.
        bn: BatchNorm policy of frozen groups: ``eval`` (stats and affine fixed), ``train``
            (both adapt), ``affine`` (affine params train at the group's LR) or ``stats``
            (running statistics adapt, affine fixed: frozen epochs stay forward-only).
        ddp_safe: gate frozen groups by zero LR and dropped gradients instead of
            ``requires_grad`` (None: on under DDP).
        restart_schedule: rebuild the module's step-interval LR scheduler at each milestone over
            the steps to the next one, so each phase gets its own cycle (fastai's ``fine_tune``).
        log_lrs: log ``unfreezing/phase`` and ``unfreezing/lr/<group>`` at each epoch start.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tl_lightning.modules.finetune import FineTuneModule
        >>> model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None)
        >>> unfreeze = GradualUnfreezing(milestones={5: ["layer4"], 10: [".*"]}, lr_ratio=0.1)
        >>> trainer = Trainer(max_epochs=20, callbacks=[unfreeze])
    """

    def __init__(
        self,
        unfreeze_at_epoch: int | None = None,
        every_n_epochs: int | None = None,
        milestones: dict[int, list[str]] | None = None,
        lr_ratio: float | None = None,
        lr_decay: float = 1.0,
        lr_spread: float | None = None,
        group_lrs: dict[str, float] | None = None,
        unfrozen_lr_scale: float = 1.0,
        warmup_steps: int = 0,
        bn: str = "eval",
        ddp_safe: bool | None = None,
        restart_schedule: bool = False,
        log_lrs: bool = True,
    ):
        given = [x is not None for x in (unfreeze_at_epoch, every_n_epochs, milestones)]
        if sum(given) > 1:
            raise ValueError(
                "give only one of unfreeze_at_epoch, every_n_epochs and milestones, got "
                f"unfreeze_at_epoch={unfreeze_at_epoch}, every_n_epochs={every_n_epochs}, "
                f"milestones={milestones}"
            )
        if not any(given):
            unfreeze_at_epoch = 1
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise ValueError(f"unfreeze_at_epoch must be >= 0, got {unfreeze_at_epoch}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if milestones is not None and any(int(e) < 0 for e in milestones):
            raise ValueError(f"milestone epochs must be >= 0, got {sorted(milestones)}")
        if lr_ratio is not None and lr_ratio <= 0:
            raise ValueError(
                f"lr_ratio must be > 0 (or null to keep the module's LRs), got {lr_ratio}"
            )
        if lr_spread is not None and (lr_spread < 1 or lr_ratio is not None):
            raise ValueError(
                f"lr_spread must be >= 1 and replaces lr_ratio/lr_decay, got lr_spread={lr_spread}, lr_ratio={lr_ratio}"
            )
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if unfrozen_lr_scale <= 0:
            raise ValueError(f"unfrozen_lr_scale must be > 0, got {unfrozen_lr_scale}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.every_n_epochs = every_n_epochs
        self.milestones = {int(k): list(v) for k, v in (milestones or {}).items()} or None
        self.lr_ratio = lr_ratio
        self.lr_decay = lr_decay
        self.lr_spread = lr_spread
        self.group_lrs = dict(group_lrs or {})
        self.unfrozen_lr_scale = unfrozen_lr_scale
        self.warmup_steps = warmup_steps
        self.bn = BNPolicy(bn)
        self.ddp_safe = ddp_safe
        self.restart_schedule = restart_schedule
        self.log_lrs = log_lrs
        # persisted (state_dict): when each group unfroze, which phase the scheduler was built for
        self._unfreeze_step: dict[str, int] = {}
        self._sched_phase: int | None = None
        self._plain_base: dict[int, float] = {}
        self._restored = False
        # per fit: the backbone, the schedule, and where each group lives in the optimizer
        self._backbone: Backbone | None = None
        self._events: list[tuple[int, list[str]]] = []
        # "head" / "backbone.<group>" / other group name -> index of the optimizer param group
        self._index: dict[str, int] = {}
        self._target: dict[int, float] = {}
        self._orig_min_lrs: list[float] | None = None
        self._built_phase: int | None = None
        self._frozen_params: list[torch.nn.Parameter] = []
        self._announced: set[str] = set()

    # --- schedule ---------------------------------------------------------------------------
    def _build_events(self, backbone: Backbone) -> list[tuple[int, list[str]]]:
        names = backbone.group_names()
        if self.unfreeze_at_epoch is not None:
            return [(self.unfreeze_at_epoch, list(names))]
        if self.every_n_epochs is not None:
            top_first = list(reversed(names))
            return [(self.every_n_epochs * (i + 1), [n]) for i, n in enumerate(top_first)]
        events = []
        for epoch in sorted(self.milestones):
            chosen = [g.name for g in backbone.select_groups(self.milestones[epoch])]
            events.append((epoch, chosen))
        return events

    def unfrozen_groups(self, epoch: int) -> list[str]:
        """Backbone groups trainable during ``epoch`` (input side first)."""
        on = {n for e, names in self._events if e <= epoch for n in names}
        return [n for n in self._backbone.group_names() if n in on]

    def phase(self, epoch: int) -> int:
        """How many milestones have passed at ``epoch`` (0: only the head trains)."""
        return sum(1 for e, _ in self._events if e <= epoch)

    def _phase_span(self, phase: int, max_epochs: int) -> tuple[int, int]:
        starts = [0] + [e for e, _ in self._events]
        end = starts[phase + 1] if phase + 1 < len(starts) else max_epochs
        return starts[phase], max(end, starts[phase] + 1)

    # --- hooks ------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backbone = getattr(pl_module, "backbone", None)
        if not isinstance(backbone, Backbone):
            raise ValueError(
                f"GradualUnfreezing needs a module with a tl_lightning Backbone at `.backbone`; "
                f"{type(pl_module).__name__} has {type(backbone).__name__}"
            )
        self._backbone = backbone
        self._events = self._build_events(backbone)
        if self.ddp_safe is None:
            self.ddp_safe = isinstance(trainer.strategy, DDPStrategy)
        elif not self.ddp_safe and isinstance(trainer.strategy, DDPStrategy):
            rank_zero_info(
                "GradualUnfreezing: ddp_safe=False under DDP: groups unfrozen later are not "
                "gradient-synced (Lightning #20340); weights will drift between ranks"
            )
        # FineTuneModule leaves fully frozen groups out of the optimizer unless told otherwise.
        if hasattr(pl_module, "include_frozen_groups"):
            pl_module.include_frozen_groups = True
        self._apply_freezing(0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GradualUnfreezing works with one optimizer, the module configured {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        self._index = self._map_groups(optimizer)
        scheduler = self._scheduler(trainer)
        if self.restart_schedule and getattr(pl_module, "scheduler_factory", None) is None:
            raise ValueError(
                "restart_schedule=True rebuilds the module's lr_scheduler per phase, but the module "
                "has none: set model.lr_scheduler (e.g. tl_lightning.optim.OneCycleLR) or restart_schedule=false"
            )
        if isinstance(scheduler, ReduceLROnPlateau):
            self._orig_min_lrs = list(scheduler.min_lrs)
        saved_plain = self._plain_base if self._restored else None
        self._plain_base = {i: g["lr"] for i, g in enumerate(optimizer.param_groups)}
        # targets always come from the freshly configured optimizer, as in an uninterrupted run
        raw = {i: self._base(optimizer, scheduler, i) for i in range(len(optimizer.param_groups))}
        self._target = self._targets(raw)
        if saved_plain:
            self._plain_base = saved_plain
        self._built_phase = None
        self._announced = set()
        # a resumed run gets its optimizer/scheduler state from the checkpoint right after this
        if not self._restored:
            self._sync(trainer, 0, trainer.global_step)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        for name in self.unfrozen_groups(epoch):
            self._unfreeze_step.setdefault(name, step)
        newly = [n for n in self.unfrozen_groups(epoch) if n not in self._announced]
        self._apply_freezing(epoch)
        pl_module.train(pl_module.training)  # re-apply the BN policy to groups that changed
        if self.restart_schedule and self._built_phase != self.phase(epoch):
            self._rebuild_scheduler(trainer, pl_module, epoch, step)
        self._sync(trainer, epoch, step)
        if newly:
            optimizer = trainer.optimizers[0]
            lrs = ", ".join(
                f"backbone.{n} (lr {optimizer.param_groups[self._index['backbone.' + n]]['lr']:.2e})"
                for n in reversed(newly)
            )
            rank_zero_info(
                f"GradualUnfreezing: epoch {epoch}, phase {self.phase(epoch)}: training {lrs}"
            )
            self._announced |= set(newly)
        if self.log_lrs:
            optimizer = trainer.optimizers[0]
            metrics = {"unfreezing/phase": float(self.phase(epoch))}
            for name, i in self._index.items():
                metrics[f"unfreezing/lr/{name}"] = float(optimizer.param_groups[i]["lr"])
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, rank_zero_only=True)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.warmup_steps and any(
            trainer.global_step - s < self.warmup_steps for s in self._unfreeze_step.values()
        ):
            self._sync(trainer, trainer.current_epoch, trainer.global_step)

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        # Exact freeze for any optimizer: torch optimizers skip params without a gradient
        # (no momentum, no weight decay). In ddp_safe mode this is what keeps frozen params fixed.
        for p in self._frozen_params:
            p.grad = None

    # --- freezing -----------------------------------------------------------------------------
    def _apply_freezing(self, epoch: int) -> None:
        backbone = self._backbone
        on = self.unfrozen_groups(epoch)
        off = [n for n in backbone.group_names() if n not in on]
        if on:
            backbone.unfreeze([re.escape(n) for n in on])
        if off:
            backbone.freeze([re.escape(n) for n in off], bn=self.bn)
        trains_affine = self.bn in (BNPolicy.TRAIN, BNPolicy.AFFINE)
        frozen = []
        for group in backbone.layer_groups():
            if group.name in on:
                continue
            bn_params = {
                id(p) for m in group.batchnorms.values() for p in m.parameters(recurse=False)
            }
            frozen += [p for p in group.params if not (trains_affine and id(p) in bn_params)]
        self._frozen_params = frozen
        if self.ddp_safe:  # DDP registers only params that require grad when it wraps the model
            for p in backbone.parameters():
                p.requires_grad_(True)

    # --- optimizer groups and LRs -------------------------------------------------------------
    def _map_groups(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        owner = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        index: dict[str, int] = {}
        for group in self._backbone.layer_groups():
            where = {owner.get(id(p)) for p in group.params}
            members = {id(p) for p in group.params}
            i = next(iter(where)) if len(where) == 1 else None
            if i is None or any(id(p) not in members for p in optimizer.param_groups[i]["params"]):
                raise ValueError(
                    f"GradualUnfreezing needs one optimizer param group per backbone layer group, "
                    f"frozen ones included; layer group '{group.name}' is spread over optimizer "
                    f"groups {sorted(w for w in where if w is not None)} (None: missing). Use "
                    "FineTuneModule, or return such groups from param_groups()"
                )
            index[f"backbone.{group.name}"] = i
        taken = set(index.values())
        for i, g in enumerate(optimizer.param_groups):
            if i not in taken:
                index[str(g.get("name", f"group{i}"))] = i
        return index

    def _targets(self, raw: dict[int, float]) -> dict[int, float]:
        head = self._index.get("head")
        if (self.lr_ratio is not None or self.lr_spread is not None) and head is None:
            raise ValueError(
                "lr_ratio is relative to the head LR, but no optimizer param group is named 'head'"
            )
        target = dict(raw)
        ratio, decay = self.lr_ratio, self.lr_decay
        if self.lr_spread is not None:
            ratio = decay = (1 / self.lr_spread) ** (1 / len(self._backbone.group_names()))
        for depth, name in enumerate(reversed(self._backbone.group_names()), start=1):
            i = self._index[f"backbone.{name}"]
            if ratio is not None:
                target[i] = raw[head] * ratio * decay ** (depth - 1)
            explicit = [
                lr for s, lr in self.group_lrs.items() if s == name or re.fullmatch(s, name)
            ]
            if explicit:
                target[i] = explicit[0]
        return target

    def desired_lrs(self, epoch: int, step: int) -> dict[int, float]:
        """Base LR of each optimizer group at ``epoch``/``step`` (before the scheduler's factor)."""
        on = set(self.unfrozen_groups(epoch))
        scale = self.unfrozen_lr_scale if self.phase(epoch) > 0 else 1.0
        lrs = {}
        for name, i in self._index.items():
            lr = self._target[i] * scale
            if name.startswith("backbone."):
                group = name.removeprefix("backbone.")
                if group not in on:
                    lr = lr if self.bn in (BNPolicy.TRAIN, BNPolicy.AFFINE) else 0.0
                elif self.warmup_steps:
                    start = self._unfreeze_step.get(group, step)
                    lr *= min(1.0, (step - start + 1) / self.warmup_steps)
            lrs[i] = lr
        return lrs

    def _sync(self, trainer: Trainer, epoch: int, step: int) -> None:
        optimizer, scheduler = trainer.optimizers[0], self._scheduler(trainer)
        head = self._index.get("head", 0)
        for i, lr in self.desired_lrs(epoch, step).items():
            if not math.isclose(
                self._base(optimizer, scheduler, i), lr, rel_tol=1e-12, abs_tol=0.0
            ):
                self._set_base(optimizer, scheduler, i, lr, head)

    @staticmethod
    def _scheduler(trainer: Trainer) -> Any:
        optimizer = trainer.optimizers[0]
        for cfg in trainer.lr_scheduler_configs:
            if getattr(cfg.scheduler, "optimizer", None) is optimizer:
                return cfg.scheduler
        return None

    def _base(self, optimizer: Any, scheduler: Any, i: int) -> float:
        group = optimizer.param_groups[i]
        if isinstance(scheduler, OneCycleLR):
            return group["max_lr"]
        if scheduler is not None and not isinstance(scheduler, ReduceLROnPlateau):
            return scheduler.base_lrs[i]
        return self._plain_base.get(i, group["lr"])

    def _set_base(self, optimizer: Any, scheduler: Any, i: int, new: float, ref: int) -> None:
        """Move group ``i``'s base LR to ``new``, keeping the scheduler's current factor."""
        group = optimizer.param_groups[i]
        old = self._base(optimizer, scheduler, i)
        if old > 0:
            factor = group["lr"] / old
        else:  # a group coming out of lr 0 takes the reference group's progress through the schedule
            ref_base = self._base(optimizer, scheduler, ref)
            factor = optimizer.param_groups[ref]["lr"] / ref_base if ref_base > 0 else 1.0
        if isinstance(scheduler, OneCycleLR):
            ref_group = next((g for g in optimizer.param_groups if g["max_lr"] > 0), None)
            init_ratio = ref_group["initial_lr"] / ref_group["max_lr"] if ref_group else 1 / 25
            min_ratio = ref_group["min_lr"] / ref_group["max_lr"] if ref_group else 1 / 25e4
            group["max_lr"], group["initial_lr"], group["min_lr"] = (
                new,
                new * init_ratio,
                new * min_ratio,
            )
        elif isinstance(scheduler, ReduceLROnPlateau):
            self._plain_base[i] = new
            if self._orig_min_lrs is not None:
                scheduler.min_lrs[i] = self._orig_min_lrs[i] if new > 0 else 0.0
        elif scheduler is not None:
            scheduler.base_lrs[i] = new
            group["initial_lr"] = new
        else:
            self._plain_base[i] = new
        group["lr"] = new * factor
        last = getattr(scheduler, "_last_lr", None)
        if isinstance(last, list) and i < len(last):
            last[i] = group["lr"]

    def _rebuild_scheduler(
        self, trainer: Trainer, pl_module: LightningModule, epoch: int, step: int
    ) -> None:
        cfg = next(
            c for c in trainer.lr_scheduler_configs if c.scheduler is self._scheduler(trainer)
        )
        if cfg.interval != "step":
            raise ValueError(
                "restart_schedule needs a step-interval scheduler that takes total_steps "
                f"(OneCycleLR, WarmupCosine); got {type(cfg.scheduler).__name__}"
            )
        phase, optimizer = self.phase(epoch), trainer.optimizers[0]
        old = cfg.scheduler
        resume_mid_phase = (
            self._built_phase is None and self._sched_phase == phase and self._restored
        )
        saved = old.state_dict() if resume_mid_phase else None
        # lr, momentum/betas (OneCycle cycles them) as restored from the checkpoint
        current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        for i, lr in self.desired_lrs(epoch, step).items():
            group = optimizer.param_groups[i]
            group["lr"] = lr
            for key in ("initial_lr", "max_lr", "min_lr"):
                group.pop(key, None)
        start, end = self._phase_span(phase, trainer.max_epochs)
        per_epoch = math.ceil(trainer.estimated_stepping_batches / max(1, trainer.max_epochs))
        new = make_scheduler(pl_module.scheduler_factory, optimizer, (end - start) * per_epoch)[
            "scheduler"
        ]
        if saved is not None:  # mid-phase resume: continue the checkpointed cycle where it was
            new.load_state_dict(saved)
            if getattr(new, "total_steps", None) == saved.get("total_steps"):
                for group, hyper in zip(optimizer.param_groups, current, strict=True):
                    group.update(hyper)
            # else: an extended run; the scheduler set this step's values of its longer cycle
        cfg.scheduler = new
        self._built_phase = self._sched_phase = phase

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restored = False

    # --- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "unfreeze_step": dict(self._unfreeze_step),
            "sched_phase": self._sched_phase,
            "plain_base": dict(self._plain_base),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unfreeze_step = dict(state_dict.get("unfreeze_step", {}))
        self._sched_phase = state_dict.get("sched_phase")
        self._plain_base = {int(k): v for k, v in state_dict.get("plain_base", {}).items()}
        self._restored = True
