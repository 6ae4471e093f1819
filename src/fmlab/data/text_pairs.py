"""Source -> target text pairs for seq2seq fine-tuning (translation, summarisation): read, clean, split, tokenize
once into a cache (each side cut to its maximum length, EOS last), pad per batch; the raw texts travel with each
batch as the references generation is scored against. Presets: `bbc_headlines` (article -> headline) and, where
Debian's Bible modules are installed, `bible_en_es` (fmlab/data/bible.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

import fmlab.data.bible  # noqa: F401  (registers the bible_en_es preset)
from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.sampling import complete_splits
from fmlab.data.sources import (
    DataError,
    Preset,
    bbc_news_files,
    deduplicate,
    fingerprint,
    read_split_table,
    register_preset,
)
from fmlab.data.span_corpus import PAD_TOKENS, decoder_start_id
from fmlab.data.tokenizer import EOS, TokenizerSource, find_token, train_bpe

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
EOS_TOKENS = (EOS, "</s>")  # ours, and T5's
IGNORE = -100  # label padding the loss skips


def title_and_body(text: str) -> tuple[str, str]:
    """A document's first line (its title, a headline) and the rest."""
    title, _, body = str(text).strip().partition("\n")
    return title.strip(), body.strip()


def read_bbc_headlines() -> list[dict[str, str]]:
    """BBC News articles -> {"source": article, "target": headline, "topic"}: each file is the headline, a blank
    line, the article; files deduplicated as bbc_news is (2,127 of 2,225), in the same order."""
    records = [{"text": p.read_bytes().decode("utf-8", errors="replace"), "topic": p.parent.name}
               for p in bbc_news_files()]
    pairs = []
    for record in deduplicate(records):
        headline, article = title_and_body(record["text"])
        if headline and article:
            pairs.append({"source": article, "target": headline, "topic": record["topic"]})
    return pairs


def unique_pairs(records: list[dict], source_column: str, target_column: str) -> list[dict]:
    """The records without repeated (source, target) pairs, first ones kept, so a split cannot leak a pair."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for r in records:
        key = (str(r[source_column]), str(r[target_column]))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    if len(unique) < len(records):
        log.info("Dropped %d duplicate pairs (%d unique)", len(records) - len(unique), len(unique))
    return unique


register_preset(Preset("bbc_headlines", "text", read=lambda: {"all": read_bbc_headlines()}, files=bbc_news_files))


class PairExamples(Dataset):
    """Tokenized pairs (flat ids + offsets per side) and their raw texts."""

    def __init__(self, arrays: dict[str, np.ndarray], texts: dict[str, list[str]]) -> None:
        self.a, self.texts = arrays, texts

    def __len__(self) -> int:
        return len(self.a["source_offsets"]) - 1

    def side(self, name: str, i: int) -> torch.Tensor:
        start, end = self.a[f"{name}_offsets"][i], self.a[f"{name}_offsets"][i + 1]
        return torch.from_numpy(self.a[f"{name}_ids"][start:end].astype(np.int64))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.side("source", i), "labels": self.side("target", i),
                "source": self.texts["source"][i], "reference": self.texts["target"][i]}


class PairCollate:
    """Right-pad sources (pad id, attention mask) and targets (IGNORE); raw texts as lists."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        S, T = max(len(it["input_ids"]) for it in items), max(len(it["labels"]) for it in items)
        batch = {"input_ids": torch.full((len(items), S), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(items), S, dtype=torch.long),
                 "labels": torch.full((len(items), T), IGNORE, dtype=torch.long)}
        for i, it in enumerate(items):
            n, m = len(it["input_ids"]), len(it["labels"])
            batch["input_ids"][i, :n] = it["input_ids"]
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :m] = it["labels"]
        batch["sources"] = [it["source"] for it in items]
        batch["references"] = [it["reference"] for it in items]
        return batch


class TextPairsDataModule(TokenizerSource, CachedDataModule):
    """Pairs from a preset, a saved Hugging Face dataset, or .jsonl / .csv / .parquet files (columns
    `source_column` / `target_column`; a folder of train.* / val.* / test.* files gives its splits). Missing splits
    are cut from train, seeded (stratified on `stratify_column` where given). `source_prefix` is written before
    every source (T5's task prefixes: "summarize: "). `text_column` instead reads one text per row: its first line
    is the target (a title, a headline), the rest the source (bbc_news read so is bbc_headlines). `tokenizer`: a
    source to load one from, a `tokenizers.Tokenizer` (a pretrained run's), or None to train a BPE on train."""

    cache_prefix, cache_title = "pairs", "text-pair"

    def __init__(
        self,
        source: str = "bbc_headlines",
        source_column: str = "source",
        target_column: str = "target",
        text_column: str | None = None,
        source_prefix: str = "",
        stratify_column: str | None = None,
        tokenizer: str | Tokenizer | None = None,
        vocab_size: int = 8192,
        max_source_length: int = 512,
        max_target_length: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 1234,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        for option, length in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
            if length < 2:
                raise DataError(f"data.{option}={length} must be at least 2 (a token and EOS)")
        self.source, self.tokenizer_source, self.vocab_size_wanted = str(source), tokenizer, vocab_size
        self.source_prefix, self.text_column = source_prefix, text_column
        # One text per row: its title and body become these columns.
        self.source_column, self.target_column = ("source", "target") if text_column else (source_column, target_column)
        self.stratify_column = stratify_column
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.val_fraction, self.test_fraction, self.eval_batch_size = val_fraction, test_fraction, eval_batch_size
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, PairExamples] = {}

    @property
    def columns(self) -> list[str]:
        """The columns read from the source."""
        sides = [self.text_column] if self.text_column else [self.source_column, self.target_column]
        return [c for c in (*sides, self.stratify_column) if c]

    def read(self) -> dict[str, list[dict]]:
        """The source's records per split, as {source_column, target_column, stratify_column}."""
        parts = read_split_table(self.source, self.columns)
        if not self.text_column:
            return parts
        out = {}
        for split, records in parts.items():
            out[split] = []
            for r in records:
                title, body = title_and_body(r[self.text_column] or "")
                out[split].append({**r, "source": body, "target": title})
        return out

    def cache_spec(self) -> dict:
        return {"source": fingerprint(self.source), "columns": self.columns, "prefix": self.source_prefix,
                "tokenizer": self.tokenizer_key(), "lengths": [self.max_source_length, self.max_target_length],
                "split": [self.val_fraction, self.test_fraction, self.seed]}

    def clean(self, records: list[dict], split: str) -> list[dict]:
        """Drop rows with an empty source or target, with a warning that counts them."""
        def ok(r: dict) -> bool:
            return all(r[c] is not None and str(r[c]).strip() for c in (self.source_column, self.target_column))

        kept = [r for r in records if ok(r)]
        if len(kept) < len(records):
            log.warning("Dropped %d of %d rows of the %s split of %s: empty %r or %r", len(records) - len(kept),
                        len(records), split, self.source, self.source_column, self.target_column)
        return kept

    def split(self, parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """The given splits, with the missing ones cut (seeded, stratified where asked) from the training data."""
        if "all" in parts:  # identical pairs once (a source with two targets stays twice, as bbc_news keeps both)
            parts = {"train": unique_pairs(parts.pop("all"), self.source_column, self.target_column), **parts}

        def strata(train: list[dict]) -> list:
            return [str(r[self.stratify_column]) for r in train] if self.stratify_column else [0] * len(train)

        return complete_splits(parts, self.source, self.val_fraction, self.test_fraction, self.seed, strata)

    def texts(self, records: list[dict]) -> dict[str, list[str]]:
        return {"source": [self.source_prefix + str(r[self.source_column]).strip() for r in records],
                "target": [str(r[self.target_column]).strip() for r in records]}

    def encode(self, tok: Tokenizer, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
        """Token ids cut to `max_length - 1`, then EOS; flat with offsets."""
        eos = find_token(tok, EOS_TOKENS)
        if eos is None:
            raise DataError(f"data.tokenizer: no end-of-sequence token (one of {EOS_TOKENS})")
        rows = [enc.ids[: max_length - 1] + [eos] for enc in tok.encode_batch(texts, add_special_tokens=False)]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        ids = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(lengths.sum()))
        return {"ids": ids, "offsets": np.concatenate([[0], np.cumsum(lengths)])}

    def build_cache(self, folder: Path) -> dict:
        log.info("Tokenizing %s", self.source)
        parts = self.split({s: self.clean(r, s) for s, r in self.read().items()})
        texts = {s: self.texts(parts[s]) for s in SPLITS}
        if self.given_tokenizer is not None:
            tok = Tokenizer.from_str(self.given_tokenizer.to_str())
        else:
            tok = train_bpe(texts["train"]["source"] + texts["train"]["target"], self.vocab_size_wanted)
        tok.no_truncation()
        tok.no_padding()
        tok.save(str(folder / "tokenizer.json"))
        lengths = {"source": self.max_source_length, "target": self.max_target_length}
        for s in SPLITS:
            arrays = {f"{side}_{k}": v for side in ("source", "target")
                      for k, v in self.encode(tok, texts[s][side], lengths[side]).items()}
            np.savez(folder / f"{s}.npz", **arrays)
            (folder / f"{s}.json").write_text(json.dumps(texts[s]))
        examples = {s: len(parts[s]) for s in SPLITS}
        log.info("Text pairs: %s examples", examples)
        return {"source": self.source, "examples": examples, "vocab_size": tok.get_vocab_size()}

    def load(self, folder: Path, meta: dict) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.datasets = {s: PairExamples(dict(np.load(folder / f"{s}.npz")), json.loads((folder / f"{s}.json")
                                         .read_text())) for s in SPLITS}

    def describe(self) -> DataInfo:
        self.setup()
        return DataInfo(
            model={"vocab_size": self.tokenizer.get_vocab_size(), "decoder_start_id": decoder_start_id(self.tokenizer)},
            state={"tokenizer": self.tokenizer.to_str()},
            tokenizer=self.tokenizer,
            max_length=self.max_source_length,
        )

    def collate(self) -> PairCollate:
        pad = find_token(self.tokenizer, PAD_TOKENS)
        return PairCollate(pad if pad is not None else 0)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.datasets["train"], drop_last=False, collate_fn=self.collate())

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.datasets["val"], self.eval_batch_size, collate_fn=self.collate())

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.datasets["test"], self.eval_batch_size, collate_fn=self.collate())
