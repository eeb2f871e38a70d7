"""``tl-lightning``: LightningCLI with fit/validate/test/predict, linked preprocessing and good defaults."""

from __future__ import annotations

import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.tuner import Tuner

from tl_lightning.callbacks import CSVPredictionWriter, LRMonitor
from tl_lightning.callbacks.finite_loss import FiniteLossCheck
from tl_lightning.callbacks.resumable_checkpoint import ResumableModelCheckpoint
from tl_lightning.callbacks.rng_state import RNGStateCheckpoint
from tl_lightning.callbacks.skipped_images import SkippedImagesReport
from tl_lightning.callbacks.visuals import TensorBoardVisuals
from tl_lightning.checkpoint_io import resolve_last, use_atomic_checkpoint_io
from tl_lightning.checkpoint_safety import (
    check_checkpoint,
    check_lightning_checkpoint,
    load_checkpoint_safely,
)
from tl_lightning.cli_errors import ConfigErrorParser
from tl_lightning.config_checks import check_backbone_config
from tl_lightning.lightning_compat import short_description
from tl_lightning.precision import TLTrainer


class TLCLI(LightningCLI):
    """The LightningCLI behind ``tl-lightning``.

    Links: ``model.backbone``/``model.weights`` -> the datamodule's preprocessing, and the
    datamodule's ``num_classes``/``class_names`` -> the model, so each is set in one place.
    Defaults: TensorBoard logs under ``runs/``, checkpoints of the best ``val/acc`` and ``last``,
    LearningRateMonitor, ``seed_everything: 0``, predictions to ``predictions.csv``.
    Extra subcommand ``lr_find``: Lightning's LR range test on the configured model, data and
    callbacks (GradualUnfreezing included: the test runs in the first, head-only phase).
    """

    # Arguments of Tuner.lr_find that the CLI fills itself rather than taking from the command line.
    _LR_FIND_SKIP = {
        "model",
        "train_dataloaders",
        "val_dataloaders",
        "dataloaders",
        "datamodule",
        "method",
        "update_attr",
        "attr_name",
    }

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "lr_find": TLCLI._LR_FIND_SKIP}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        # Lightning looks each subcommand up on the Trainer; lr_find lives on the Tuner.
        self._subcommand_parsers = {}
        parser_subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            klass = Tuner if subcommand == "lr_find" else self.trainer_class
            description = short_description(getattr(klass, subcommand))
            subparser_kwargs = kwargs.get(subcommand, {})
            subparser_kwargs.setdefault("description", description)
            subcommand_parser = self._prepare_subcommand_parser(
                klass, subcommand, **subparser_kwargs
            )
            self._subcommand_parsers[subcommand] = subcommand_parser
            parser_subcommands.add_subcommand(subcommand, subcommand_parser, help=description)

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "lr_find":
            self.lr_find(**self._prepare_subcommand_kwargs(subcommand))
        else:
            super()._run_subcommand(subcommand)

    def lr_find(
        self, model: LightningModule, datamodule: LightningDataModule | None = None, **kwargs
    ) -> float | None:
        """Run the LR range test, print the suggestion and the flag to use it, save ``lr_find.png``."""
        finder = Tuner(self.trainer).lr_find(
            model, datamodule=datamodule, update_attr=False, **kwargs
        )
        if not self.trainer.is_global_zero:
            return None
        if finder is None:  # Lightning skips the search under fast_dev_run
            print("lr_find: skipped (fast_dev_run is set)")
            return None
        lr = finder.suggestion()
        if lr is None:
            print("lr_find: no suggestion (too few points; raise --num_training)")
            return None
        try:
            finder.plot(suggest=True).savefig("lr_find.png")
            plot = " (plot: lr_find.png)"
        except Exception:  # matplotlib missing or headless trouble: the number is what matters
            plot = ""
        print(f"suggested learning rate: {lr:.3g}{plot}")
        print(
            f"use it with: tl-lightning fit ... --model.init_args.optimizer.init_args.lr={lr:.3g}"
        )
        return lr

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")
        parser.link_arguments("model.init_args.weights", "data.init_args.weights")
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.class_names", "model.init_args.class_names", apply_on="instantiate"
        )
        parser.add_lightning_class_args(ResumableModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LRMonitor, "lr_monitor")
        parser.add_lightning_class_args(CSVPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(SkippedImagesReport, "skipped_images")
        parser.add_lightning_class_args(FiniteLossCheck, "finite_loss")
        parser.add_lightning_class_args(RNGStateCheckpoint, "rng_state")
        parser.add_lightning_class_args(TensorBoardVisuals, "visuals")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:02d}",
                "checkpoint.auto_insert_metric_name": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {
                        "save_dir": "runs",
                        "name": "default",
                        "default_hp_metric": False,
                    },
                },
            }
        )

    def before_instantiate_classes(self) -> None:
        """Stop on an unknown backbone or weights tag before anything is built."""
        check_backbone_config(self.config.get(str(self.subcommand), self.config))

    def _parse_ckpt_path(self) -> None:
        """Lightning reads ``--ckpt_path`` hyperparameters at parse time: vet the file first."""
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        ckpt = load_checkpoint_safely(config.get("ckpt_path"), config.get("weights_only"))
        if ckpt is not None:
            check_lightning_checkpoint(ckpt, config.get("ckpt_path"))
        super()._parse_ckpt_path()

    def _check_ckpt_path(self) -> None:
        """--ckpt_path: refuse code-carrying pickles and a checkpoint trained on other classes."""
        config = self.config_init.get(str(self.subcommand), self.config_init)
        check_checkpoint(
            config.get("ckpt_path"), self.model, self.datamodule, config.get("weights_only")
        )

    before_validate = before_test = before_predict = _check_ckpt_path

    def before_fit(self) -> None:
        """Resolve ``--ckpt_path last`` across logger versions, then check the checkpoint."""
        config = self.config_init[str(self.subcommand)]
        config["ckpt_path"] = resolve_last(self.trainer, config.get("ckpt_path"))
        self._check_ckpt_path()

    def predict(
        self, model: LightningModule, datamodule=None, return_predictions=None, **kwargs
    ) -> list | None:
        """``Trainer.predict`` keeping nothing in memory unless ``--return_predictions=true``.

        Rows stream to the CSV writer; Lightning's default would also hold every prediction.
        """
        keep = bool(return_predictions)
        return self.trainer.predict(model, datamodule=datamodule, return_predictions=keep, **kwargs)

    def instantiate_trainer(self, **kwargs):
        """The configured Trainer, with atomic (temp file + fsync + rename) checkpoint writes."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        val = trainer.callback_metrics.get("val/acc")
        lines = []
        if val is not None:
            lines.append(f"final val/acc: {float(val):.4f}")
        if ckpt is not None and ckpt.best_model_score is not None:
            lines.append(
                f"best val/acc: {float(ckpt.best_model_score):.4f} -> {ckpt.best_model_path}"
            )
        if trainer.logger is not None and trainer.logger.log_dir:
            lines.append(f"TensorBoard: tensorboard --logdir {trainer.logger.log_dir}")
        print("\n".join(lines))


def _print_backbones() -> None:
    from tl_lightning.backbones import list_backbones

    print("registered (offline-capable where noted):")
    for name, description in list_backbones().items():
        print(f"  {name:24s} {description}")
    print("plus any torchvision classification model (e.g. resnet50, torchvision/vit_b_16)")
    print("and any timm model (e.g. timm/convnext_tiny); weights: DEFAULT, a tag, null, or a file")


def run_cli(args: list[str] | None = None, run: bool = True) -> TLCLI | None:
    """Run ``tl-lightning`` with ``args`` (default: sys.argv) and return the CLI object.

    ``run=False`` only builds the model, data and trainer (args without a subcommand).
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["backbones"]:
        _print_backbones()
        return None
    if argv[:1] == ["advise"]:  # not a Trainer method: its own small parser (tl_lightning.advisor)
        from tl_lightning.advisor.command import format_advice
        from tl_lightning.advisor.command import main as advise_main

        print(format_advice(advise_main(argv[1:])))  # the CLI prints; the library returns
        return None
    # `args` only when given: LightningCLI warns on every run that gets it ("intended to run from
    # within Python"), and reads sys.argv itself otherwise.
    given = {} if args is None else {"args": args}
    return TLCLI(
        LightningModule,
        LightningDataModule,
        trainer_class=TLTrainer,  # accepts precision: mixed
        parser_class=ConfigErrorParser,  # names the bad key and the closest valid ones
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        run=run,
        **given,
    )


def main() -> None:
    """Entry point of ``tl-lightning`` and ``python -m tl_lightning``."""
    run_cli()


if __name__ == "__main__":
    main()
