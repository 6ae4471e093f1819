"""SQuAD-format sources for question answering: SQuAD v1.1 / v2.0 JSON (`data` / `paragraphs` / `qas`), JSONL
rows or saved Hugging Face datasets with `id`, `context`, `question`, `answers`, a folder (or glob) of such files
named by split; every answer checked against its context, splits cut by article or context.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fmlab.data.sources import SPLIT_NAMES, DataError, is_hf_dataset, load_hf_dataset
from fmlab.resolve import resolve_path

SUFFIXES = (".json", ".jsonl")
# A file's split from the start of its name: train-v2.0.json, dev-v1.1.json, validation.jsonl (not "training").
SPLIT_PREFIX = re.compile(r"^(train|validation|valid|val|dev|test)(?![a-z])")


def field(row: object, name: str, where: str) -> object:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a {name!r} field, found {type(row).__name__}")
    if name not in row:
        raise DataError(f"{where}: no field {name!r}; fields present: {sorted(row)}")
    return row[name]


def answer_pairs(raw: object, where: str) -> list[tuple[object, object]]:
    """(text, answer_start) pairs from SQuAD's list of objects or Hugging Face's columns of lists."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        texts, starts = field(raw, "text", f"{where}.answers"), field(raw, "answer_start", f"{where}.answers")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(f"{where}: answers.text and answers.answer_start must be lists of the same length")
        return list(zip(texts, starts, strict=True))
    if isinstance(raw, list):
        return [(field(a, "text", f"{where}.answers[{i}]"), field(a, "answer_start", f"{where}.answers[{i}]"))
                for i, a in enumerate(raw)]
    raise DataError(f"{where}: answers must be a list of {{text, answer_start}} or {{text: [...], answer_start: "
                    f"[...]}}, found {type(raw).__name__}")


def checked_answer(context: str, text: object, start: object, where: str) -> tuple[str, int]:
    """The answer stripped of surrounding whitespace, after checking that `answer_start` points at it."""
    if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
        raise DataError(f"{where}: answers need a text string and an integer answer_start, found "
                        f"{text!r} at {start!r}")
    found = context[start:start + len(text)]
    if start < 0 or found != text or not text.strip():
        raise DataError(f"{where}: answers.answer_start={start} does not point at the answer text {text!r} in the "
                        f"context (it reads {found!r} there)")
    return text.strip(), start + len(text) - len(text.lstrip())


def question_record(qa: dict, context: str, title: str, where: str) -> dict:
    """One question in our form: id, title, context, question, answers [(text, start)] (empty: unanswerable)."""
    qid = field(qa, "id", where)
    where = f"{where} (id {qid!r})"
    question = field(qa, "question", where)
    if not isinstance(context, str) or not isinstance(question, str):
        raise DataError(f"{where}: context and question must be strings")
    impossible = bool(qa.get("is_impossible", False))
    pairs = [] if impossible else answer_pairs(field(qa, "answers", where), where)
    answers = [checked_answer(context, text, start, where) for text, start in pairs]
    return {"id": str(qid), "title": str(title or ""), "context": context, "question": question,
            "answers": answers, "where": where}


def read_squad_json(path: Path) -> Iterator[dict]:
    """SQuAD's own layout: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (no top-level 'data' list of articles); JSON rows go in a .jsonl")
    for i, article in enumerate(doc["data"]):
        paragraphs = field(article, "paragraphs", f"{path}: data[{i}]")
        for j, paragraph in enumerate(paragraphs):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            context = field(paragraph, "context", where)
            for k, qa in enumerate(field(paragraph, "qas", where)):
                yield question_record(qa, context, article.get("title", ""), f"{where}.qas[{k}]")


def read_rows(rows: Iterator[dict], where: str) -> Iterator[dict]:
    """Flat rows (JSONL, a Hugging Face dataset): id, context, question, answers, optional title."""
    for n, row in enumerate(rows, 1):
        at = f"{where} {n}"
        yield question_record(row, field(row, "context", at), row.get("title", "") if isinstance(row, dict) else "",
                              at)


def jsonl_rows(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as err:
                    raise DataError(f"{path}: line {n} is not JSON ({err})") from err


def read_squad_file(path: Path) -> list[dict]:
    if path.suffix.lower() == ".json":
        return list(read_squad_json(path))
    if path.suffix.lower() == ".jsonl":
        return list(read_rows(jsonl_rows(path), f"{path}: line"))
    raise DataError(f"data.source: unsupported file type {path.suffix!r} for {path}; use one of {list(SUFFIXES)}")


def split_of(path: Path) -> str | None:
    """The split a file's name gives (train-v2.0.json -> train, dev-v2.0.json -> val), else None."""
    found = SPLIT_PREFIX.match(path.stem.lower())
    return SPLIT_NAMES[found.group(1)] if found else None


def squad_files(source: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob -> its .json / .jsonl files."""
    path = resolve_path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    elif glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        raise DataError(f"data.source: no such file or folder: {source}")
    if not files:
        raise DataError(f"data.source: no .json / .jsonl files found at {source}")
    return files


def read_questions(source: str) -> dict[str, list[dict]]:
    """Questions per split the source gives (train / val / test), else {"all": questions}."""
    path = resolve_path(source)
    if is_hf_dataset(path):
        return {SPLIT_NAMES.get(split, split): list(read_rows(iter(ds), f"{path} ({split} split): row"))
                for split, ds in load_hf_dataset(path).items()}
    files = squad_files(source)
    splits = {f: split_of(f) for f in files}
    if len(files) == 1 or not all(splits.values()):
        return {"all": [q for f in files for q in read_squad_file(f)]}
    out: dict[str, list[dict]] = {}
    for f, split in splits.items():
        out.setdefault(split, []).extend(read_squad_file(f))
    return out


def group_key(question: dict) -> str:
    """What must stay in one split: the article (its title) where there is one, else the context."""
    return question["title"] or question["context"]


def cut_groups(questions: list[dict], fractions: list[float], seed: int, source: str) -> list[list[dict]]:
    """[rest, cut 1, cut 2...]: whole articles / contexts, seeded, each cut `fraction` of them (at least one)."""
    keys = list(dict.fromkeys(group_key(q) for q in questions))
    counts = [max(1, round(f * len(keys))) if f > 0 else 0 for f in fractions]
    if sum(counts) >= len(keys):
        raise DataError(f"data.source={source}: {len(keys)} articles / contexts are too few to cut val and test "
                        f"splits from; give more data, split files, or lower data.val_fraction / data.test_fraction")
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    part_of, at = {}, 0
    for part, n in enumerate(counts, 1):
        part_of.update({k: part for k in order[at:at + n]})
        at += n
    parts: list[list[dict]] = [[] for _ in range(len(fractions) + 1)]
    for q in questions:
        parts[part_of.get(group_key(q), 0)].append(q)
    return parts
