"""Put back the train loader's checkpointed position when Lightning built the loader too early.

Lightning 2.6 loads a checkpoint's loader state (our :class:`ResumableDataLoader`'s ``{"epoch",
"batches"}``) only while the fit loop builds the train loader, after the checkpoint is restored.
Reading ``trainer.estimated_stepping_batches`` before that (every scheduler that needs the run's
length, in ``configure_optimizers``; DANN's schedule) builds the loader first; the fit loop then
keeps that loader and its iterator, and the saved state is never loaded: a resumed run silently
restarts the interrupted epoch at batch 0 (Lightning issue #20550).
"""

from __future__ import annotations

from lightning.pytorch import Trainer


def restore_train_loader_state(trainer: Trainer) -> bool:
    """Load the checkpoint's pending train-loader state into the already built loader.

    Call it once the checkpoint is restored and before the first batch (``on_train_start``).
    It does what the fit loop's ``setup_data`` does on a normal resume: load the states, then
    recreate the iterator so it starts at the saved batch. Returns whether a state was loaded.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> restore_train_loader_state(Trainer(logger=False))  # nothing pending
        False
    """
    loop = trainer.fit_loop
    pending = getattr(loop, "_combined_loader_states_to_load", None)
    if not pending or loop._combined_loader is None or loop._data_fetcher is None:
        return False  # the fit loop loaded it itself (or there is nothing to load)
    loop._load_combined_loader_states()
    loop._data_fetcher.setup(loop._combined_loader)
    iter(loop._data_fetcher)  # the old iterator started at batch 0: start a new one
    return True
