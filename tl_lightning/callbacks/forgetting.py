"""Log what fine-tuning forgets at every validation: source agreement, source accuracy, CKA drift."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from tl_lightning.backbones.source_head import imagenet_class_names
from tl_lightning.forgetting import ReferenceSet


class ForgettingMonitor(Callback):
    """Measure forgetting against the run's frozen starting point on a fixed reference set.

    Logs ``val/source_agreement`` (no labels needed), ``val/cka_drift`` and, when ``source_dir``
    has ``<source class>/`` sub-folders, ``val/source_acc`` and ``val/forgetting``; see
    :mod:`tl_lightning.forgetting` for how to read them. The starting network's outputs on the
    reference set are computed once; each validation costs one forward pass over ``num_images``.

    Args:
        source_dir: a folder of images (flat, or ``<ImageNet class name>/*.jpg`` for accuracy).
            Default: ``num_images`` seeded crops of the photos scikit-image and scikit-learn ship.
        num_images: size of the default reference set.
        image_size: reference image side (default the backbone's pretraining input size).
        seed: seeds the default set's crops.

    Works with :class:`~tl_lightning.modules.FineTuneModule`; it turns on the module's starting
    point (``track_forgetting``) if nothing else had.

    Example:
        >>> trainer = Trainer(callbacks=[ForgettingMonitor(num_images=64)])
    """

    def __init__(self, source_dir: str | None = None, num_images: int = 64, image_size: int | None = None, seed: int = 0, batch_size: int = 32):
        self.source_dir, self.num_images, self.image_size = source_dir, num_images, image_size
        self.seed, self.batch_size = seed, batch_size
        self.reference: ReferenceSet | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "keep_start"):
            raise TypeError(f"ForgettingMonitor needs a FineTuneModule, got {type(pl_module).__name__}")
        start = pl_module.keep_start()  # before any training step and before a resume loads the real one
        if start.source_head is None:
            rank_zero_warn(
                f"ForgettingMonitor: backbone '{pl_module.hparams.backbone}' has no pretraining classifier "
                "(random init, a weights file or a cut layer): only val/cka_drift is logged"
            )
        if self.reference is None:
            config = pl_module.backbone.data_config
            if self.source_dir is None:
                self.reference = ReferenceSet.default(config, self.num_images, self.image_size, self.seed, self.batch_size)
            else:
                names = imagenet_class_names() if start.source_head is not None and start.source_head.out_features == 1000 else None
                self.reference = ReferenceSet.from_folder(self.source_dir, config, names, self.image_size, self.batch_size)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return  # nothing has trained yet; Lightning discards sanity-check logs anyway
        measures = self.reference.measure(pl_module.backbone, pl_module.start)
        for name, value in measures.items():
            # every rank measures the same images with the same weights: no sync needed
            pl_module.log(f"val/{name}", value)
