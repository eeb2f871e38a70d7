"""A confusion-matrix figure in TensorBoard after every validation epoch (and after a test)."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tl_lightning.callbacks.visual_utils import class_names, tensorboard_writer


def confusion_figure(cm: torch.Tensor, names: list[str], title: str = ""):
    """A matplotlib Figure of ``cm`` (rows true, columns predicted) coloured by row-normalised rate.

    Non-zero counts are written in the cells up to 20 classes; class names label the axes up to 50.
    """
    from matplotlib.figure import Figure

    cm = cm.detach().float().cpu()
    n = len(cm)
    rates = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    show_names = n <= 50
    size = 9 if n <= 20 else 6
    # fixed margins sized for the longest class name: constrained layout costs ~0.2 s a figure
    label = (max(len(c) for c in names) * 0.6 * size + 30) / 72 if show_names else 0.5
    plot = min(2.5 + 0.4 * n, 16.0)
    width, height = plot + label + 1.6, plot + label + 0.6
    fig = Figure(figsize=(width, height), dpi=80)
    fig.subplots_adjust(
        left=label / width,
        bottom=label / height,
        right=1 - 1.4 / width,
        top=1 - 0.5 / height,
    )
    ax = fig.add_subplot()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if show_names:
        ax.set_xticks(range(n), names, rotation=90, fontsize=size)
        ax.set_yticks(range(n), names, fontsize=size)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if cm[i, j] == 0:  # blank zeros keep the mistakes visible
                    continue
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {float(cm.diag().sum() / cm.sum().clamp(min=1)):.3f}")
    return fig


class ConfusionMatrixFigure(Callback):
    """Logs the module's ``last_confusion_matrix`` as a figure with class names on the axes.

    Works with every :class:`~tl_lightning.modules.base.ClassifierModule` (feature extraction,
    fine-tuning, DANN on source val): the module computes the matrix over all ranks at the end
    of each validation (and test) epoch; this callback draws it on rank 0 as
    ``val/confusion_matrix`` (``test/confusion_matrix``). A no-op without a TensorBoardLogger
    or a module that keeps no confusion matrix.

    Example:
        >>> trainer = Trainer(callbacks=[ConfusionMatrixFigure()], logger=TensorBoardLogger("runs"))
    """

    def __init__(self, every_n_epochs: int = 1):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs

    def _log(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        writer = tensorboard_writer(trainer)
        cm = getattr(module, "last_confusion_matrix", None)
        if writer is None or cm is None:
            return
        fig = confusion_figure(cm, class_names(trainer, module, len(cm)))
        writer.add_figure(f"{stage}/confusion_matrix", fig, global_step=trainer.global_step)

    # on_*_end, not on_*_epoch_end: the module's own epoch-end hook (which computes the matrix)
    # runs after the callbacks' epoch-end hooks.
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log(trainer, pl_module, "val")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, "test")
