"""Put the train loader where the resumed run's first batch is: the checkpoint's position.

Two cases where Lightning 2.6 leaves our :class:`ResumableDataLoader` at the wrong place:

- **Loader built too early.** Lightning loads a checkpoint's loader state (``{"epoch",
  "batches"}``) only while the fit loop builds the train loader, after the checkpoint is restored.
  Reading ``trainer.estimated_stepping_batches`` before that (every scheduler that needs the run's
  length, in ``configure_optimizers``; DANN's schedule) builds the loader first; the fit loop then
  keeps that loader and its iterator, and the saved state is never loaded: a resumed run silently
  restarts the interrupted epoch at batch 0 (Lightning issue #20550).
- **Checkpoint at an epoch's end.** An epoch cut short by ``limit_train_batches`` ends before the
  loader runs out, so the loader's saved count (4 of 10 batches, say) looks mid-epoch. The fit
  loop knows better (its saved ``is_last_batch``) and starts the next epoch, but it hands the
  loader its state all the same whenever it "restarts" (always under ``max_steps``): the loader
  then skipped 4 batches of the next epoch's order. Under ``max_steps``, a checkpoint written in
  ``on_train_epoch_end`` also made the fit loop count the finished epoch's batches into the next
  one, which it then ended early.
"""

from __future__ import annotations

from lightning.pytorch import Trainer

from tl_lightning.data.resumable_sampler import ResumableDataLoader


def restore_train_loader_state(trainer: Trainer) -> bool:
    """Load the checkpoint's train-loader position into the built loader, or start the next epoch.

    Call it once the checkpoint is restored and before the first batch (``on_train_start``).
    A pending state (the loader was built before the restore) is loaded as the fit loop's
    ``setup_data`` would; a checkpoint written after an epoch's last batch (``is_last_batch``,
    whatever ``limit_train_batches`` cut it to) puts every resumable loader at batch 0 of the
    epoch the fit loop runs next. Either way the iterator is recreated so it starts at the new
    place. Returns whether the loader was moved.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> restore_train_loader_state(Trainer(logger=False))  # nothing to restore
        False
    """
    loop = trainer.fit_loop
    if loop._combined_loader is None or loop._data_fetcher is None:
        return False
    moved = False
    if getattr(loop, "_combined_loader_states_to_load", None):
        loop._load_combined_loader_states()  # no-op unless the fit loop is restarting
        moved = True
    progress = loop.epoch_progress.current
    if trainer.ckpt_path is not None and loop.epoch_loop.batch_progress.is_last_batch:
        # saved after an epoch's last batch (at its end, at the validation after it, or in
        # on_train_epoch_end): whatever the fit loop still does for that epoch, the next batch it
        # trains is the first of the epoch it started next, on the iterator it already has
        if progress.processed == progress.started and loop.epoch_loop.restarted_on_last:
            # saved in on_train_epoch_end of a max_steps run: Lightning would count the finished
            # epoch's batches into the next one and end that one early
            loop.epoch_loop.batch_progress.reset_on_run()
        epoch = progress.started
        for loader in loop._combined_loader.flattened:
            if isinstance(loader, ResumableDataLoader):
                loader.load_state_dict({"epoch": epoch, "batches": 0})
                moved = True
    if moved:
        loop._data_fetcher.setup(loop._combined_loader)
        iter(loop._data_fetcher)  # the old iterator started at the old place: start a new one
    return moved
