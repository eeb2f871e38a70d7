"""TensorBoard's HParams tab: the run's hyperparameters next to its final val/test metrics."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from tl_lightning.callbacks.visual_utils import tensorboard_logger, tensorboard_writer


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested hyperparameters -> ``{"a/b": value}`` with values TensorBoard's HParams tab takes."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Namespace):
            value = vars(value)
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = value.item()
        else:  # None, lists, classes: shown as text
            out[name] = str(value)
    return out


class HParamsMetrics(Callback):
    """Logs the hyperparameters with the final validation/test metrics for TensorBoard's HParams tab.

    Lightning logs the hyperparameters at the start of a run, when no metric exists yet
    (TensorBoardLogger then adds a placeholder ``hp_metric = -1``). This callback turns that
    placeholder off and, at the end of training (or of ``validate``/``test``), writes the
    HParams session pointing at the run's real scalar tags (``val/acc``, ``val/loss``,
    ``val/f1_macro``, ``test/acc``, ...: every logged ``<stage>/<name>`` metric whose prefix is
    in ``prefixes``) plus ``best/<monitor>``, the checkpoint callback's best score. So runs can
    be compared by their final numbers. TensorBoard reads one session per run directory: after
    ``fit`` then ``test`` on one logger it holds the fit's metrics (the CLI's ``test`` is a run
    of its own, with ``test/*``). Hyperparameters: the model's and datamodule's, as
    Lightning logged them (nested ones flattened to ``a/b``). Rank 0 only; a no-op without a
    TensorBoardLogger.

    Example:
        >>> trainer = Trainer(callbacks=[HParamsMetrics()], logger=TensorBoardLogger("runs"))
    """

    def __init__(self, prefixes: Sequence[str] = ("val/", "test/")):
        self.prefixes = tuple(prefixes)
        self.metrics: dict[str, float] = {}  # the final values last written
        self._written: set[str] = set()  # log dirs that hold this callback's session

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = tensorboard_logger(trainer)
        # the placeholder `hp_metric` is meaningless: the real metrics are written at the end
        if logger is not None and hasattr(logger, "_default_hp_metric"):
            logger._default_hp_metric = False
        if stage == "fit":
            self.metrics = {}

    def _selected(self, trainer: Trainer) -> dict[str, float]:
        out = {}
        for key, value in trainer.callback_metrics.items():
            parts = key.split("/")
            if (
                key.startswith(self.prefixes)
                and len(parts) == 2
                and not key.endswith("_step")
                and isinstance(value, torch.Tensor)
                and value.numel() == 1
            ):
                out[key] = float(value)
        return out

    def _write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        writer = tensorboard_writer(trainer)
        # TensorBoard reads only the first HParams session of a run directory
        if writer is None or writer.get_logdir() in self._written:
            return
        step = trainer.global_step
        self.metrics.update(self._selected(trainer))
        ckpt = trainer.checkpoint_callback
        score = getattr(ckpt, "best_model_score", None)
        if score is not None and getattr(ckpt, "monitor", None):
            name = f"best/{ckpt.monitor}"
            self.metrics[name] = float(score)
            writer.add_scalar(name, float(score), global_step=step)
        if not self.metrics:
            return
        params = tensorboard_logger(trainer).hparams or pl_module.hparams_initial
        flat = flat_params({k: v for k, v in dict(params).items() if k != "_class_path"})
        # the metric values are the scalars already in this run (their last value), not copies
        file_writer = writer._get_file_writer()
        for summary in hparams(flat, dict(self.metrics)):
            file_writer.add_summary(summary, step)
        writer.flush()
        self._written.add(writer.get_logdir())

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._write(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module)
