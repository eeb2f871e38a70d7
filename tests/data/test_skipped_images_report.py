"""SkippedImagesReport over several epochs: each report counts only the new skips, the metric the running total."""

from __future__ import annotations

import pytest

from tests.data.test_bad_data import SMALL, make_folder
from tests.helpers import TINY, quick_trainer
from tl_lightning.callbacks.skipped_images import SkippedImagesReport
from tl_lightning.data.decode import SKIP_LOG_NAME, read_skip_log
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.modules.feature_extraction import FeatureExtractionModule


def test_each_epoch_reports_its_own_skips_and_the_metric_accumulates(tmp_path):
    root = make_folder(tmp_path / "imgs", {"ant": 8, "bee": 8, "cat": 8})
    dm = ImageFolderDataModule(str(root), val_fraction=0.25, test_fraction=0.25, **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    for path in (dm.train_set.paths[0], dm.train_set.paths[5], dm.val_set.paths[1]):
        path.write_bytes(b"")  # broke after the scan: fails at every read, every epoch

    model = FeatureExtractionModule(
        num_classes=3, class_names=dm.class_names, cache_features=False, **TINY
    )
    report = SkippedImagesReport()
    trainer = quick_trainer(
        tmp_path,
        callbacks=[report],
        max_epochs=3,
        limit_train_batches=None,
        limit_val_batches=None,
        num_sanity_val_steps=0,
    )
    with pytest.warns(UserWarning, match=r"skipped 3 image\(s\) .*\(2 train, 1 val\)"):
        trainer.fit(model, datamodule=dm)
    # 2 train + 1 val image fail in every epoch: 3 new rows per epoch, 9 in the log
    assert report.history == [(f"train epoch {e}", 3) for e in range(3)]
    assert len(read_skip_log(tmp_path / SKIP_LOG_NAME)) == 9
    assert report.total == 9 and trainer.callback_metrics["data/skipped_images"] == 9
