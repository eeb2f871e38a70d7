"""Stop training at the first NaN or infinite loss, before it reaches the weights or a checkpoint."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stopped before that update."""


class FiniteLossCheck(Callback):
    """Raise :class:`NonFiniteLossError` when a training loss is NaN or inf, before ``backward``.

    The check runs in ``on_before_backward``, so the bad loss never produces gradients, the
    weights in memory stay those of the previous step, and no checkpoint is written after it
    (``ModelCheckpoint`` saves in later hooks, which the exception skips): ``last.ckpt`` keeps the
    last good weights. Under DDP the ranks agree on the decision, so none is left waiting in an
    all-reduce. Cost: one host sync of a scalar per step (Lightning's progress bar already makes
    one). On in the CLI by default (``--finite_loss.enabled=false`` turns it off).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[FiniteLossCheck()], logger=False)
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if not self.enabled:
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(self._message(trainer, loss))

    @staticmethod
    def _message(trainer: Trainer, loss: torch.Tensor) -> str:
        value = loss.detach().float().flatten()[:1].item() if loss.numel() else float("nan")
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")
        kept = f"last good checkpoint: {last}" if last else "no checkpoint was written yet"
        batch = trainer.fit_loop.epoch_loop.batch_idx
        return (
            f"training loss is {value} at global step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}, batch_idx {batch}); training stopped before this update, so "
            f"the weights hold no NaN/inf ({kept}). Fix: lower the learning rate, set "
            f"--trainer.gradient_clip_val, use 32-true precision, or look for NaN/inf in the "
            f"inputs; then resume with --ckpt_path last or restart"
        )
