"""Extractive question answering data (SQuAD v1.1 / v2.0): read (fmlab/data/squad_sources.py), split by context,
tokenize question + context into overlapping windows once into a cache, with each answer's start / end token and
each token's character span.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from pathlib import Path

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from torch.utils.data import Dataset

from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.labeled_text import PaddedSplits, add_template
from fmlab.data.sources import DataError, fingerprint, is_hf_dataset
from fmlab.data.squad_sources import cut_groups, read_questions, squad_files
from fmlab.data.tokenizer import TokenizerSource, train_bpe
from fmlab.errors import UserError, check_count
from fmlab.resolve import resolve_path

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


# ---- tokenizing -------------------------------------------------------------------------------------------------


@cache
def whitespace_table() -> np.ndarray:
    return np.array([chr(c).isspace() for c in range(0x3001)])  # U+3000 is the last whitespace character


def is_space(text: str) -> np.ndarray:
    """Per character of `text`: whitespace or not."""
    codes, table = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), whitespace_table()
    return table[np.minimum(codes, len(table) - 1)] & (codes < len(table))


def trim_offsets(offsets: np.ndarray, space: np.ndarray) -> np.ndarray:
    """Character spans (N, 2) without leading / trailing whitespace (a byte-level BPE's ' word' starts at the
    space); a span of whitespace only becomes empty."""
    start, end = offsets[:, 0].copy(), offsets[:, 1].copy()
    last = len(space) - 1
    while True:
        lead = (start < end) & space[np.minimum(start, last)]
        tail = (start < end) & space[np.clip(end - 1, 0, last)]
        if not (lead.any() or tail.any()):
            return np.stack([start, end], axis=1)
        start, end = start + lead, end - (tail & ~lead)


def context_offsets(enc: Encoding, space: np.ndarray) -> np.ndarray:
    """(T, 2) character spans in the context of the window's context tokens; -1 elsewhere (special and question
    tokens, padding, whitespace-only tokens): where an answer may start or end."""
    offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
    context = np.array(enc.sequence_ids, dtype=float) == 1  # None (special tokens) -> nan
    out = np.full_like(offsets, -1)
    out[context] = trim_offsets(offsets[context], space)
    out[out[:, 0] >= out[:, 1]] = -1
    return out


def answer_positions(offsets: np.ndarray, answer: tuple[str, int] | None) -> tuple[int, int]:
    """Start and end token of the answer when the window holds all of it; else (0, 0), the CLS position."""
    tokens = np.flatnonzero(offsets[:, 0] >= 0)
    if answer is None or tokens.size == 0:
        return 0, 0
    a, b = answer[1], answer[1] + len(answer[0])
    starts, ends = offsets[tokens, 0], offsets[tokens, 1]
    if starts[0] > a or ends[-1] < b:
        return 0, 0
    return int(tokens[np.flatnonzero(starts <= a)[-1]]), int(tokens[np.flatnonzero(ends >= b)[0]])


def clip_questions(tok: Tokenizer, questions: list[str], limit: int) -> list[str]:
    """Questions cut to at most `limit` tokens (without special tokens), at a token's end."""
    out = []
    for q, enc in zip(questions, tok.encode_batch(questions, add_special_tokens=False), strict=True):
        keep = limit
        while len(enc.ids) > limit and keep > 0:  # a cut word may tokenize into more pieces: cut further
            q = q[:enc.offsets[keep - 1][1]]
            enc, keep = tok.encode(q, add_special_tokens=False), keep - 1
        out.append(q)
    return out


def encode_windows(tok: Tokenizer, questions: list[dict], max_length: int, doc_stride: int,
                   max_question_length: int) -> dict[str, np.ndarray]:
    """Every question's windows: question + a stretch of its context (`doc_stride` tokens shared by neighbours),
    flattened: ids, type_ids, offsets (context character spans, -1 elsewhere), per window its bounds, answer
    start / end token and question index. Leaves `tok` without padding or truncation."""
    tok.no_padding()
    tok.no_truncation()
    texts = clip_questions(tok, [q["question"].strip() for q in questions], max_question_length)
    tok.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
    try:
        encs = tok.encode_batch(list(zip(texts, [q["context"] for q in questions], strict=True)))
    finally:
        tok.no_truncation()
    spaces: dict[str, np.ndarray] = {}
    ids, type_ids, offsets, starts, ends, example = [], [], [], [], [], []
    for n, (q, enc) in enumerate(zip(questions, encs, strict=True)):
        if q["context"] not in spaces:
            spaces[q["context"]] = is_space(q["context"])
        space = spaces[q["context"]]
        answer = q["answers"][0] if q["answers"] else None
        for window in [enc, *enc.overflowing]:
            offs = context_offsets(window, space)
            start, end = answer_positions(offs, answer)
            ids.append(window.ids)
            type_ids.append(window.type_ids)
            offsets.append(offs)
            starts.append(start)
            ends.append(end)
            example.append(n)
    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    return {
        "ids": np.concatenate(ids).astype(np.int32),
        "type_ids": np.concatenate(type_ids).astype(np.int8),
        "offsets": np.concatenate(offsets).astype(np.int32),
        "bounds": np.concatenate([[0], np.cumsum(lengths)]),
        "start_positions": np.array(starts, dtype=np.int32),
        "end_positions": np.array(ends, dtype=np.int32),
        "example": np.array(example, dtype=np.int32),
    }


def example_table(questions: list[dict]) -> dict:
    """What post-processing and scoring need per question: id, context (stored once per context), gold texts."""
    contexts = list(dict.fromkeys(q["context"] for q in questions))
    index = {c: i for i, c in enumerate(contexts)}
    return {"ids": [q["id"] for q in questions], "contexts": contexts,
            "context_of": [index[q["context"]] for q in questions],
            "answers": [[text for text, _ in q["answers"]] for q in questions]}


# ---- datasets ---------------------------------------------------------------------------------------------------


class QuestionWindows(Dataset):
    """One window (question + a stretch of context) per item; `examples` maps window -> question for scoring."""

    def __init__(self, arrays: dict[str, np.ndarray], examples: dict) -> None:
        self.a, self.examples = arrays, examples

    def __len__(self) -> int:
        return len(self.a["example"])

    def context(self, example: int) -> str:
        return self.examples["contexts"][self.examples["context_of"][example]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        lo, hi = self.a["bounds"][i], self.a["bounds"][i + 1]
        return {
            "input_ids": torch.from_numpy(self.a["ids"][lo:hi].astype(np.int64)),
            "token_type_ids": torch.from_numpy(self.a["type_ids"][lo:hi].astype(np.int64)),
            "offset_mapping": torch.from_numpy(self.a["offsets"][lo:hi].astype(np.int64)),
            "start_positions": torch.tensor(int(self.a["start_positions"][i])),
            "end_positions": torch.tensor(int(self.a["end_positions"][i])),
            "example_index": torch.tensor(int(self.a["example"][i])),
        }


class WindowCollate:
    """Right-pad windows to the longest of the batch: ids with the pad token, offsets with -1 (never an answer)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        B, T = len(items), max(len(it["input_ids"]) for it in items)
        batch = {"input_ids": torch.full((B, T), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(B, T, dtype=torch.long),
                 "token_type_ids": torch.zeros(B, T, dtype=torch.long),
                 "offset_mapping": torch.full((B, T, 2), -1, dtype=torch.long)}
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            batch["input_ids"][i, :n] = it["input_ids"]
            batch["attention_mask"][i, :n] = 1
            batch["token_type_ids"][i, :n] = it["token_type_ids"]
            batch["offset_mapping"][i, :n] = it["offset_mapping"]
        for key in ("start_positions", "end_positions", "example_index"):
            batch[key] = torch.stack([it[key] for it in items])
        return batch


class QuestionAnsweringDataModule(PaddedSplits, TokenizerSource, CachedDataModule):
    """SQuAD-format questions as windows of `max_length` tokens: question first, then the context, long contexts
    in several windows sharing `doc_stride` tokens (Hugging Face run_qa's layout).

    Splits: the source's own (split files), the missing ones cut seeded from the training questions by article
    (title) or context, so no context is in two splits. `tokenizer`: a source to load one from, a
    `tokenizers.Tokenizer`, or None to train a byte-level BPE on the training questions and contexts.
    """

    cache_prefix, cache_title = "squad", "question-answering"
    collate_class = WindowCollate

    def __init__(
        self,
        source: str,
        tokenizer: str | Tokenizer | None = None,
        vocab_size: int = 8192,
        max_length: int = 384,
        doc_stride: int | None = None,
        max_question_length: int = 64,
        template: str | None = None,
        pair_template: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 1234,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_count("data.max_length", max_length)
        check_count("data.max_question_length", max_question_length)
        doc_stride = max_length // 3 if doc_stride is None else doc_stride
        if isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or doc_stride < 0:
            raise UserError(f"data.doc_stride={doc_stride}: must be a whole number of at least 0")
        for name, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
            if not 0 <= value < 1:
                raise UserError(f"{name}={value}: must be in [0, 1)")
        self.source, self.tokenizer_source, self.vocab_size_wanted = str(source), tokenizer, vocab_size
        self.max_length, self.doc_stride, self.max_question_length = max_length, doc_stride, max_question_length
        self.template, self.pair_template = template, pair_template
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.tokenizer: Tokenizer | None = None
        self.meta: dict = {}
        self.datasets: dict[str, QuestionWindows] = {}

    def cache_spec(self) -> dict:
        if not is_hf_dataset(resolve_path(self.source)):
            squad_files(self.source)  # a missing source or one without .json / .jsonl files: say so first
        return {
            "source": fingerprint(self.source),
            "tokenizer": self.tokenizer_key(),
            "windows": [self.max_length, self.doc_stride, self.max_question_length],
            "template": [self.template, self.pair_template],
            "split": [self.val_fraction, self.test_fraction, self.seed],
        }

    def clean(self, questions: list[dict], split: str) -> list[dict]:
        """Drop questions with an empty question or context (with a count); a repeated id is an error."""
        kept = [q for q in questions if q["question"].strip() and q["context"].strip()]
        if len(kept) < len(questions):
            log.warning("Dropped %d of %d questions of the %s split of %s: empty question or context",
                        len(questions) - len(kept), len(questions), split, self.source)
        seen: set[str] = set()
        for q in kept:
            if q["id"] in seen:
                raise DataError(f"{q['where']}: the id {q['id']!r} is repeated in the {split} split; ids must be "
                                "unique (predictions are keyed by them)")
            seen.add(q["id"])
        return kept

    def split(self, parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """The given splits, with the missing ones cut from the training questions by article / context."""
        if "all" in parts:
            parts = {"train": parts.pop("all"), **parts}
        if "train" not in parts:
            raise DataError(f"data.source={self.source}: no training split (found {sorted(parts)}); name a file "
                            "train*.json(l)")
        want = [s for s in ("val", "test") if s not in parts]
        if want:
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            cut = cut_groups(parts["train"], [fractions[s] for s in want], self.seed, self.source)
            parts = {**parts, "train": cut[0], **dict(zip(want, cut[1:], strict=True))}
        for s in SPLITS:
            if not parts[s]:
                raise DataError(f"data.source={self.source}: the {s} split is empty; use more data or other "
                                f"fractions (data.val_fraction, data.test_fraction)")
        return parts

    def prepare_tokenizer(self, train: list[dict]) -> Tokenizer:
        """The given tokenizer (a copy) or a BPE trained on the training split, framed for pairs, no padding."""
        if self.given_tokenizer is not None:
            tok = Tokenizer.from_str(self.given_tokenizer.to_str())
        else:
            texts = [*dict.fromkeys(q["context"] for q in train), *(q["question"] for q in train)]
            tok = train_bpe(texts, self.vocab_size_wanted)
        tok.no_padding()
        tok.no_truncation()
        add_template(tok, self.template, self.pair_template)
        room = self.max_length - tok.num_special_tokens_to_add(is_pair=True) - self.max_question_length
        if room <= self.doc_stride:
            raise UserError(
                f"data.doc_stride={self.doc_stride}: windows of data.max_length={self.max_length} tokens keep "
                f"only {max(room, 0)} for the context after a question of up to data.max_question_length="
                f"{self.max_question_length} tokens; the stride must be smaller: lower it or max_question_length"
            )
        return tok

    def build_cache(self, folder: Path) -> dict:
        """Read, clean, split and tokenize every split into the scratch folder."""
        log.info("Tokenizing %s", self.source)
        parts = self.split({s: self.clean(q, s) for s, q in read_questions(self.source).items()})
        tok = self.prepare_tokenizer(parts["train"])
        meta: dict = {"source": self.source, "examples": {}, "windows": {}, "unanswerable": {}}
        for s in SPLITS:
            arrays = encode_windows(tok, parts[s], self.max_length, self.doc_stride, self.max_question_length)
            np.savez(folder / f"{s}.npz", **arrays)
            (folder / f"{s}_examples.json").write_text(json.dumps(example_table(parts[s])))
            meta["examples"][s], meta["windows"][s] = len(parts[s]), len(arrays["example"])
            meta["unanswerable"][s] = sum(not q["answers"] for q in parts[s])
        tok.enable_truncation(self.max_length)  # as saved beside the run and in checkpoints
        tok.save(str(folder / "tokenizer.json"))
        meta["vocab_size"] = tok.get_vocab_size()
        log.info("Question answering data: %s questions in %s windows, %s unanswerable", meta["examples"],
                 meta["windows"], meta["unanswerable"])
        return meta

    def load(self, folder: Path, meta: dict) -> None:
        self.meta, self.tokenizer = meta, Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.datasets = {
            s: QuestionWindows(dict(np.load(folder / f"{s}.npz")),
                               json.loads((folder / f"{s}_examples.json").read_text()))
            for s in SPLITS
        }

    @property
    def has_unanswerable(self) -> bool:
        """Whether any split holds unanswerable questions (SQuAD v2.0)."""
        self.setup()
        return any(self.meta["unanswerable"].values())

    def describe(self) -> DataInfo:
        self.setup()
        return DataInfo(
            model={"vocab_size": self.tokenizer.get_vocab_size()},
            task={"has_unanswerable": self.has_unanswerable},
            state={"tokenizer": self.tokenizer.to_str()},
            tokenizer=self.tokenizer,
            max_length=self.max_length,
        )
