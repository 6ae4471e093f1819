"""Tag sequences (BIO / BIOES): how a sequence of per-word tags reads as entities, the way CoNLL's `conlleval` and
`seqeval` (default mode) read it. Shared by the tagged-data reader and the entity metrics."""

from __future__ import annotations

from collections.abc import Sequence

IGNORE = -100  # a position that carries no tag (special tokens, padding, sub-tokens after a word's first)


def split_tag(tag: str) -> tuple[str, str]:
    """"B-person" -> ("B", "person"); "O" -> ("O", "")."""
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if kind else ("I", prefix)  # a bare type counts as inside (IO tagging)


def ends_chunk(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    """Does an entity end before this tag? (conlleval's endOfChunk)"""
    return prev in ("E", "S") or (prev in ("B", "I") and tag in ("B", "S", "O")) or (
        prev != "O" and prev_type != kind
    )


def starts_chunk(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    """Does an entity start at this tag? (conlleval's startOfChunk)"""
    return tag in ("B", "S") or (prev in ("E", "S", "O") and tag in ("E", "I")) or (tag != "O" and prev_type != kind)


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first, last) positions."""
    found, start, prev, prev_type = set(), None, "O", ""
    for i, raw in enumerate([*tags, "O"]):
        tag, kind = split_tag(raw)
        if start is not None and ends_chunk(prev, prev_type, tag, kind):
            found.add((prev_type, start, i - 1))
            start = None
        if starts_chunk(prev, prev_type, tag, kind):
            start = i
        prev, prev_type = tag, kind
    return found


def entity_types(label_names: Sequence[str]) -> list[str]:
    """The entity types a tag set names, sorted ("B-person", "I-person" -> "person")."""
    return sorted({split_tag(name)[1] for name in label_names} - {""})
