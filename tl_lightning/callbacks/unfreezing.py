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
from torch.utils.data import Dataset

from tl_lightning.backbones.backbone import Backbone, BNPolicy
from tl_lightning.optim import make_scheduler

# Frozen BatchNorm layers sit in eval mode on purpose; Lightning's fit-start warning is noise here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

FROZEN_HEADS = ("sgd", "probe")


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
      fit start, at each epoch start and when a run resumes mid-epoch, so resuming mid-phase
      is exact (#21901);
    - a scheduler's per-group base LRs move with the group (``base_lrs``/``initial_lr``,
      OneCycle's ``max_lr``, ReduceLROnPlateau's ``min_lrs``);
    - frozen BatchNorm layers follow ``bn`` and stay that way after every ``model.train()`` (#15062);
    - under DDP (``ddp_safe``, the default there) frozen params keep ``requires_grad=True`` so DDP
      syncs them once they unfreeze, and their gradients are dropped before each step (#20340);
    - while the backbone is frozen no autograd graph is built through it, and with
      ``cache_frozen`` the frozen epochs train the head on features computed once (below).

    **Cached frozen phase.** While no backbone group is trainable, the frozen backbone maps each
    image to the same features every epoch when ``bn`` is ``eval``, the backbone has no active
    dropout / drop-path, and the train pipeline is deterministic (``augment: none``, no
    MixUp/CutMix). Then (``cache_frozen``, the default) the train and validation features are
    computed once (the on-disk cache :class:`~tl_lightning.modules.FeatureExtractionModule` uses,
    so the two share it) and the frozen epochs run on them; the first unfreeze switches back to
    images. Same batches, same order, same head weights as the uncached path (tested); a run
    resumed inside the frozen phase reads the cache again. With ``bn: stats`` the BatchNorm
    statistics and the train features come from one pass over the train images (see
    :meth:`_adapt_bn_statistics`: batch statistics for the train features, as the uncached path
    normalises its training batches; their average, AdaBN's estimate, for validation). Off under
    DDP (the backbone would get no gradients for DDP to reduce) and, with a reason logged,
    whenever a condition fails.

    **Probe head** (``frozen_head: probe``). With the cache in use, the head is fitted once, at the
    start of the frozen phase, by the full-batch L-BFGS linear probe on the cached train features
    (L2 strength chosen on the cached validation features; :mod:`tl_lightning.probe`), instead of
    by SGD epochs; the remaining frozen steps then change nothing (every gradient is dropped before
    the optimizer step, so no optimizer state moves either) while the schedule runs on, and the
    backbone unfreezes on schedule from the probe's head, as LP-FT (Kumar et al. 2022) starts.
    Where the cache cannot be used (reason logged) the frozen epochs train the head by SGD.

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
        lr_growth: multiply an unfrozen group's LR by this once per epoch after it unfroze,
            never above the head's LR (Lightning's ``BackboneFinetuning`` doubles it per epoch by
            default: ``lr_growth: 2.0``, tested against Lightning's own); 1.0 keeps it constant.
        warmup_steps: ramp a newly unfrozen group's LR linearly from 0 over this many steps.
        bn: BatchNorm policy of frozen groups: ``eval`` (stats and affine fixed), ``train``
            (both adapt), ``affine`` (affine params train at the group's LR), ``stats``
            (running statistics adapt, affine fixed: frozen epochs stay forward-only) or
            ``auto`` (``affine`` for pretrained weights, ``train`` for random init): the one
            vocabulary of :class:`~tl_lightning.backbones.BNPolicy`.
        ddp_safe: gate frozen groups by zero LR and dropped gradients instead of
            ``requires_grad`` (None: on under DDP).
        restart_schedule: rebuild the module's step-interval LR scheduler at each milestone over
            the steps to the next one, so each phase gets its own cycle (fastai's ``fine_tune``).
        log_lrs: log ``unfreezing/phase`` and ``unfreezing/lr/<group>`` at each epoch start.
        cache_frozen: train the frozen epochs on cached features where that is exact (above).
        frozen_head: ``sgd`` (default): the frozen epochs train the head with the module's
            optimizer; ``probe``: fit it once by the L-BFGS probe on the cached features (above;
            needs a linear head, ignores label smoothing and class weights).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tl_lightning.modules.finetune import FineTuneModule
        >>> model = FineTuneModule(num_classes=10, backbone="resnet18", weights=None)
        >>> unfreeze = GradualUnfreezing(milestones={5: ["layer4"], 10: [".*"]}, lr_ratio=0.1)
        >>> trainer = Trainer(max_epochs=20, callbacks=[unfreeze])
        >>> lp_then_ft = GradualUnfreezing(unfreeze_at_epoch=2, bn="stats", frozen_head="probe")
        >>> # BackboneFinetuning's schedule (backbone at 0.1x, doubled each epoch), frozen phase cached
        >>> like_lightning = GradualUnfreezing(
        ...     unfreeze_at_epoch=2, lr_ratio=0.1, lr_growth=2.0, bn="stats"
        ... )
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
        lr_growth: float = 1.0,
        warmup_steps: int = 0,
        bn: str = "eval",
        ddp_safe: bool | None = None,
        restart_schedule: bool = False,
        log_lrs: bool = True,
        cache_frozen: bool = True,
        frozen_head: str = "sgd",
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
        if lr_growth <= 0:
            raise ValueError(f"lr_growth must be > 0, got {lr_growth}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if frozen_head not in FROZEN_HEADS:
            raise ValueError(
                f"frozen_head must be one of {list(FROZEN_HEADS)}, got '{frozen_head}'"
            )
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.every_n_epochs = every_n_epochs
        self.milestones = {int(k): list(v) for k, v in (milestones or {}).items()} or None
        self.lr_ratio = lr_ratio
        self.lr_decay = lr_decay
        self.lr_spread = lr_spread
        self.group_lrs = dict(group_lrs or {})
        self.unfrozen_lr_scale = unfrozen_lr_scale
        self.lr_growth = lr_growth
        self.warmup_steps = warmup_steps
        self.bn = BNPolicy.parse(bn)  # `auto` is resolved in setup(), once the weights are known
        self.ddp_safe = ddp_safe
        self.restart_schedule = restart_schedule
        self.log_lrs = log_lrs
        self.cache_frozen = cache_frozen
        self.frozen_head = frozen_head
        self._switchable: list[FrozenPhaseDataset] = []  # the datamodule's train/val sets, wrapped
        # persisted (state_dict): when each group unfroze, which phase the scheduler was built for
        self._unfreeze_step: dict[str, int] = {}
        self._sched_phase: int | None = None
        self._plain_base: dict[int, float] = {}
        self._restored = False
        self._head_from_probe = False  # frozen_head: probe has fitted the head (persisted)
        self._head_fixed = False  # this epoch: the probe's head stands, steps drop every gradient
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

    def unfrozen_at(self, group: str) -> int | None:
        """The epoch backbone ``group`` unfreezes at (None: never)."""
        return min((e for e, names in self._events if group in names), default=None)

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
        self.bn = self.bn.resolve(backbone.pretrained)
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
        self._switchable = []
        if self.frozen_head == "probe":
            head = getattr(pl_module, "head", None)
            last = head[-1] if isinstance(head, torch.nn.Sequential) and len(head) else None
            if not isinstance(last, torch.nn.Linear) or pl_module.hparams.get("head") != "linear":
                raise ValueError(
                    "frozen_head: probe fits a linear head; the module has head: "
                    f"{pl_module.hparams.get('head')!r} (use head: linear, or frozen_head: sgd)"
                )
        reason = self._why_not_cached(trainer, pl_module)
        if reason:
            if self.cache_frozen and self.phase(0) == 0:
                rank_zero_info(f"GradualUnfreezing: frozen epochs run on images: {reason}")
            if self.frozen_head == "probe" and self.phase(0) == 0:
                rank_zero_info(
                    f"GradualUnfreezing: frozen_head=probe needs the cached frozen phase ({reason}); "
                    "the frozen epochs train the head by SGD"
                )
            return
        datamodule = trainer.datamodule
        # the datamodule owns its datasets: it swaps in the switchable ones itself
        if datamodule.use_frozen_features(
            "fit", lambda dataset, split: FrozenPhaseDataset(dataset, f"{split}_set")
        ):
            for split in ("train_set", "val_set"):
                dataset = getattr(datamodule, split, None)
                if isinstance(dataset, FrozenPhaseDataset):
                    self._switchable.append(dataset)

    def _why_not_cached(self, trainer: Trainer, pl_module: LightningModule) -> str | None:
        """Why the frozen phase cannot run on cached features (``None``: it can)."""
        if not self.cache_frozen:
            return "cache_frozen=False"
        if self.phase(0) > 0:
            return "nothing is frozen at epoch 0"
        if self.bn not in (BNPolicy.EVAL, BNPolicy.STATS):
            return (
                f"bn={self.bn.value} trains frozen BatchNorm layers (eval and stats can be cached)"
            )
        if self.ddp_safe or isinstance(trainer.strategy, DDPStrategy):
            return "DDP expects gradients for the backbone"
        datamodule = getattr(trainer, "datamodule", None)
        hp = getattr(datamodule, "hparams", {})
        if not hasattr(datamodule, "use_frozen_features") or datamodule.train_set is None:
            return "no tl_lightning datamodule with a train_set"
        if hp.get("augment", "none") != "none" or hp.get("mixup_alpha") or hp.get("cutmix_alpha"):
            return "the train pipeline is random (augment/MixUp/CutMix)"
        stochastic = [
            name
            for name, m in self._backbone.named_modules()
            if any(k in type(m).__name__ for k in ("Drop", "Stochastic"))
            and float(getattr(m, "p", 0) or 0) > 0
            or float(getattr(m, "drop_prob", 0.0) or 0.0) > 0
        ]
        if stochastic:
            return f"the backbone has active dropout/drop-path ({stochastic[0]})"
        if not callable(getattr(pl_module, "features", None)) or not hasattr(pl_module, "hparams"):
            return f"{type(pl_module).__name__} is not a tl_lightning ClassifierModule"
        return None

    def _use_cache(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Features while nothing is trainable, images from the first unfreeze on."""
        on = not self.unfrozen_groups(epoch)
        if on and any(d.features is None for d in self._switchable):
            from tl_lightning.modules.feature_extraction import cache_split

            adapted = None
            if self.bn == BNPolicy.STATS:  # before any cache: the statistics are in their key
                train = next(d for d in self._switchable if d.attr_name == "train_set")
                adapted = self._adapt_bn_statistics(trainer, pl_module, train.images)
            for dataset in self._switchable:  # train first: a failed pass caches nothing
                from_pass = self.bn == BNPolicy.STATS and dataset.attr_name == "train_set"
                features = (
                    adapted
                    if from_pass
                    else cache_split(pl_module, dataset.images, dataset.attr_name)
                )
                if features is None or len(features) != len(dataset.images):  # rows would shift
                    split = dataset.attr_name.removesuffix("_set")
                    rank_zero_info(
                        f"GradualUnfreezing: {split} images failed to load; frozen epochs run on "
                        "images"
                    )
                    self._switchable = []
                    return
                dataset.features = features
        for dataset in self._switchable:
            dataset.use_features.fill_(on)
        if on and self.frozen_head == "probe":
            if not self._head_from_probe:  # once per run: a resumed run has it in its checkpoint
                self._fit_probe_head(pl_module)
            self._head_fixed = True

    def _fit_probe_head(self, pl_module: LightningModule) -> None:
        """``frozen_head: probe``: the head from the L-BFGS probe on the cached train/val features."""
        import numpy as np

        from tl_lightning.modules.probe_init import probe_head

        split = {d.attr_name: d.features for d in self._switchable}
        if "train_set" not in split or "val_set" not in split:
            raise ValueError(
                "frozen_head: probe chooses its L2 on validation features; the datamodule has no "
                "val_set to cache (set a validation split, or frozen_head: sgd)"
            )

        def tensors(features) -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.from_numpy(np.array(features.features, dtype=np.float32)),
                torch.from_numpy(np.array(features.labels)),
            )

        result = probe_head(pl_module, *tensors(split["train_set"]), *tensors(split["val_set"]))
        self._head_from_probe = True
        rank_zero_info(
            f"GradualUnfreezing: head fitted by the L-BFGS probe on cached features "
            f"(l2={result.l2:.3g}, val acc {result.val_acc:.4f}); the frozen steps leave it as is"
        )

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

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Resumed mid-epoch, Lightning skips on_train_epoch_start for that epoch (FitLoop.
        # on_advance_start); without this the rest of it would run in setup's epoch-0 state
        # (groups frozen, BN policy, images instead of cached features, the scheduler unrebuilt).
        if trainer.fit_loop.restarted_mid_epoch:
            self._enter_epoch(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._enter_epoch(trainer, pl_module)

    def _enter_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Freezing, BN modes, data source, scheduler and LRs of the current epoch, from epoch and step."""
        epoch, step = trainer.current_epoch, trainer.global_step
        for name in self.unfrozen_groups(epoch):
            self._unfreeze_step.setdefault(name, step)
        newly = [n for n in self.unfrozen_groups(epoch) if n not in self._announced]
        self._apply_freezing(epoch)
        self._head_fixed = False
        if self._switchable:
            self._use_cache(trainer, pl_module, epoch)
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
        if self._head_fixed:  # the probe solved the head: the frozen-phase steps train nothing
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    @torch.no_grad()
    def _adapt_bn_statistics(
        self, trainer: Trainer, pl_module: LightningModule, images
    ) -> Dataset | None:
        """``bn: stats`` with a cache: one pass over the train images sets every BatchNorm's statistics
        and yields the train features the frozen epochs use.

        The pass runs the BatchNorm layers in training mode over the train images in a fixed shuffled
        order (``torch.randperm`` seeded 0; batches of the datamodule's size, so each mixes the
        classes). Each batch is normalised by its own statistics, as training batches are in the
        uncached path, and those outputs are the cached train features. With ``momentum=None`` the
        running statistics become the average over the batches (AdaBN's estimate), which the
        validation features, and every evaluation, then use. One forward pass over the train split:
        the statistics and the train features of the frozen phase cost what one image epoch's
        forward costs. Returns ``None`` if an image failed to load (the frozen epochs then run on
        images).
        """
        import numpy as np
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        from tl_lightning.data.decode import skip_failed_collate
        from tl_lightning.feature_cache import FeatureDataset

        backbone = self._backbone
        bns = [
            m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        momenta = [m.momentum for m in bns]
        device = trainer.strategy.root_device
        datamodule = trainer.datamodule
        batch = getattr(datamodule, "batch_size", None) or 64
        # own generator: the global RNG must not move (a cached run trains like an uncached one)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
        was_training = backbone.training
        backbone.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        loader = DataLoader(
            images, batch_size=batch, sampler=order.tolist(), collate_fn=skip_failed_collate
        )
        backbone.to(device)
        features, labels, start = None, np.empty(len(images), dtype=np.int64), 0
        try:
            for items in tqdm(loader, desc="BatchNorm statistics + train features", leave=False):
                rows = order[start : start + batch].numpy()
                start += batch
                if not items or len(items[0]) != len(rows):  # a failed image: rows would shift
                    return None
                with trainer.precision_plugin.forward_context():
                    out = backbone(items[0].to(device)).float().cpu().numpy()
                if features is None:
                    features = np.empty((len(images), out.shape[1]), dtype=np.float32)
                features[rows], labels[rows] = out, items[1].numpy()
        finally:
            for m, momentum in zip(bns, momenta, strict=True):
                m.momentum = momentum
            backbone.train(was_training)
            pl_module.train(pl_module.training)  # the BN policy again
        return None if features is None else FeatureDataset.from_arrays(features, labels)

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
        head = self._index.get("head")
        for name, i in self._index.items():
            lr = self._target[i] * scale
            if name.startswith("backbone."):
                group = name.removeprefix("backbone.")
                if group not in on:
                    lr = lr if self.bn in (BNPolicy.TRAIN, BNPolicy.AFFINE) else 0.0
                elif self.lr_growth != 1.0:
                    grown = lr * self.lr_growth ** (epoch - self.unfrozen_at(group))
                    cap = self._target[head] * scale if head is not None else math.inf
                    lr = min(grown, max(cap, lr))  # up to the head's LR, never below the start
                if group in on and self.warmup_steps:
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
        self._head_from_probe = self._head_fixed = False  # a next fit fits its own probe
        datamodule = getattr(trainer, "datamodule", None)
        if self._switchable and hasattr(datamodule, "serve_images"):
            datamodule.serve_images()  # the datamodule takes its image datasets back
        self._switchable = []

    # --- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "unfreeze_step": dict(self._unfreeze_step),
            "sched_phase": self._sched_phase,
            "plain_base": dict(self._plain_base),
            "head_from_probe": self._head_from_probe,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unfreeze_step = dict(state_dict.get("unfreeze_step", {}))
        self._sched_phase = state_dict.get("sched_phase")
        self._plain_base = {int(k): v for k, v in state_dict.get("plain_base", {}).items()}
        self._head_from_probe = bool(state_dict.get("head_from_probe", False))
        self._restored = True


class FrozenPhaseDataset(Dataset):
    """A datamodule split that yields its images, or their cached features while ``use_features`` is set.

    The flag is a shared-memory tensor so persistent DataLoader workers see it flip; the DataLoader,
    its sampler and so the order of batches stay the same across the switch. Other attributes
    (targets, transform, a skip log...) are the image dataset's, read and written through.
    """

    _OWN = ("images", "attr_name", "features", "use_features")

    def __init__(self, images: Dataset, attr_name: str):
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "attr_name", attr_name)  # where it sits on the datamodule
        object.__setattr__(self, "features", None)
        object.__setattr__(self, "use_features", torch.zeros((), dtype=torch.bool).share_memory_())

    def __len__(self) -> int:
        return len(self.images)

    def _source(self) -> Dataset:
        return (
            self.features if self.features is not None and bool(self.use_features) else self.images
        )

    @property
    def deterministic(self) -> bool:
        """True while cached features are served (no augmentation draws to seed)."""
        return bool(getattr(self._source(), "deterministic", False))

    def __getitem__(self, index: int):
        return self._source()[index]

    def __getitems__(self, indices: list[int]) -> list:
        source = self._source()
        many = getattr(source, "__getitems__", None)
        return many(indices) if many else [source[i] for i in indices]

    def __getattr__(self, name: str):
        if name in FrozenPhaseDataset._OWN:  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.images, name)

    def __setattr__(self, name: str, value) -> None:
        if name in FrozenPhaseDataset._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.images, name, value)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
