"""Few-label sampling and stratified splits, shared by the text and image data modules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fmlab.data.sources import DataError


def few_label_indices(
    labels: Sequence, label_fraction: float | None = None, labels_per_class: int | None = None, seed: int = 0
) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of a training split.

    `label_fraction` keeps that share of each class (at least one example per class);
    `labels_per_class` keeps that many of each class (all of a smaller class). Neither keeps everything.
    """
    labels = np.asarray(labels)
    if label_fraction is not None and labels_per_class is not None:
        raise DataError("set data.label_fraction or data.labels_per_class, not both")
    if label_fraction is None and labels_per_class is None:
        return np.arange(len(labels))
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise DataError(f"data.label_fraction={label_fraction} must be in (0, 1]")
    if labels_per_class is not None and labels_per_class < 1:
        raise DataError(f"data.labels_per_class={labels_per_class} must be at least 1")
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n = labels_per_class if labels_per_class is not None else max(1, round(label_fraction * len(members)))
        keep.append(members[:n])
    return np.sort(np.concatenate(keep))


def stratified_split(
    labels: Sequence, fractions: Sequence[float], seed: int = 0
) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts per class: the given fractions, then the rest (first part)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for i, frac in enumerate(fractions, 1):
            n = round(frac * len(members))
            parts[i].append(members[start : start + n])
            start += n
        parts[0].append(members[start:])
    return [np.sort(np.concatenate(p)) for p in parts]
