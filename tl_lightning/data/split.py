"""Seeded, stratified splits of labelled items (any class size)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _allocate(n: int, fractions: np.ndarray, min_one: bool) -> np.ndarray:
    """Split ``n`` items by ``fractions``: largest-remainder rounding (each part within 1 of
    ``n * fraction``), then, with ``min_one``, every part with a positive fraction gets >= 1."""
    target = n * fractions
    counts = np.floor(target).astype(np.int64)
    order = np.argsort(-(target - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    if min_one:
        for j in np.flatnonzero((counts == 0) & (fractions > 0)):
            # take one from the most over-allocated part that can spare it
            donor = int(np.argmax(np.where(counts > 1, counts - target, -np.inf)))
            counts[donor] -= 1
            counts[j] += 1
    return counts



def stratified_split(
    labels: Sequence[int], fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices into len(fractions) parts with the same class proportions in each, seeded.

    Per class, the part sizes are ``n_class * fraction`` rounded by largest remainder (within 1),
    except that a class with at least as many samples as there are (non-empty) parts appears in
    every part. The parts are disjoint, cover all indices, and depend only on ``labels``,
    ``fractions`` and ``seed``. Works for any class size (no minimum, unlike sklearn's).
    """
    fracs = np.asarray(fractions, dtype=np.float64)
    if fracs.ndim != 1 or len(fracs) == 0 or (fracs < 0).any() or not np.isclose(fracs.sum(), 1.0):
        raise ValueError(
            f"split fractions must be >= 0 and sum to 1, got {list(fractions)} (e.g. [0.8, 0.1, 0.1])"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n_parts = int((fracs > 0).sum())
    chunks: list[list[np.ndarray]] = [[] for _ in fracs]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        counts = _allocate(len(members), fracs, min_one=len(members) >= n_parts)
        for part, chunk in zip(chunks, np.split(members, np.cumsum(counts)[:-1]), strict=True):
            part.append(chunk)
    return [
        np.sort(np.concatenate(c)).astype(np.int64) if c else np.zeros(0, np.int64) for c in chunks
    ]


def carve_val(
    labels: Sequence[int], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified ``(train_indices, val_indices)`` for datasets without a validation split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val = stratified_split(labels, (1.0 - val_fraction, val_fraction), seed)
    return train, val


