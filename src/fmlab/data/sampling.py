"""Few-label sampling and stratified splits, shared by the text and image data modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fmlab.data.sources import DataError
from fmlab.errors import check_choice

# data.val_labels: at few labels, the validation split that early stopping and the best checkpoint read is drawn as
# the training labels are ("matched", at least VAL_MIN_PER_CLASS per class), or kept whole ("all"). A run that
# chooses its checkpoint on more labels than it trains on overstates what few labels give (Oliver et al. 2018).
VAL_LABELS = ("matched", "all")
VAL_MIN_PER_CLASS = 2


def few_label_indices(
    labels: Sequence, label_fraction: float | None = None, labels_per_class: int | None = None, seed: int = 0,
    min_per_class: int = 1,
) -> np.ndarray:
    """Sorted indices of a stratified, seeded subset of a training split.

    `label_fraction` keeps that share of each class (at least `min_per_class` examples of it);
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
        n = labels_per_class if labels_per_class is not None else round(label_fraction * len(members))
        keep.append(members[: max(n, min_per_class)])
    return np.sort(np.concatenate(keep))


def few_label_val_indices(
    labels: Sequence, label_fraction: float | None, labels_per_class: int | None, seed: int,
    val_labels: str = "matched",
) -> np.ndarray:
    """Sorted indices of the validation examples a few-label run keeps: drawn as its training labels are
    (`val_labels=matched`, at least VAL_MIN_PER_CLASS per class, a draw of its own), or all of them."""
    check_choice("data.val_labels", val_labels, VAL_LABELS)
    if val_labels == "all":
        return np.arange(len(labels))
    return few_label_indices(labels, label_fraction, labels_per_class, seed + 1, min_per_class=VAL_MIN_PER_CLASS)


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


def complete_splits(
    parts: dict[str, list], source: str, val_fraction: float, test_fraction: float, seed: int,
    strata: Callable[[list], Sequence],
) -> dict[str, list]:
    """train / val / test records: the source's own splits, the missing val and test cut from train (stratified on
    `strata(train records)`, seeded), each split then shuffled (seeded) so every stretch of it mixes classes."""
    if "train" not in parts:
        raise DataError(f"data.source={source}: no training split (found {sorted(parts)})")
    want = [s for s in ("val", "test") if s not in parts]
    if want:
        train = parts["train"]
        fractions = {"val": val_fraction, "test": test_fraction}
        cut = stratified_split(strata(train), [fractions[s] for s in want], seed)
        parts = {**parts, "train": [train[i] for i in cut[0]]}
        parts.update({s: [train[i] for i in idx] for s, idx in zip(want, cut[1:], strict=True)})
    rng = np.random.default_rng(seed)
    out = {}
    for s in ("train", "val", "test"):
        if not parts[s]:
            raise DataError(f"data.source={source}: the {s} split is empty; use more data or other fractions")
        out[s] = [parts[s][i] for i in rng.permutation(len(parts[s]))]
    return out
