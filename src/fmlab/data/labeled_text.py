"""Labeled text for fine-tuning: read, split, tokenize once into a cache, sample few labels, pad per batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from torch.utils.data import DataLoader, Dataset

from fmlab.data.cache import cache_key, publish
from fmlab.data.resumable import resumable_loader
from fmlab.data.sampling import few_label_indices, stratified_split
from fmlab.data.sources import (
    DataError,
    deduplicate,
    read_bbc_news,
    read_records,
    resolve_files,
    resolve_path,
    source_fingerprint,
)
from fmlab.data.tokenizer import find_token, load_tokenizer, tokenizer_fingerprint, train_bpe

log = logging.getLogger(__name__)
CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "dev": "val", "test": "test"}
PAD_TOKENS = ("<pad>", "[PAD]")


def is_hf_dataset(path: Path) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def read_hf_dataset(path: Path, columns: list[str]) -> dict[str, list[dict]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:
        raise DataError(f"data.source={path} is a saved Hugging Face dataset: pip install datasets") from err

    loaded = load_from_disk(str(path))
    parts = dict(loaded) if isinstance(loaded, DatasetDict) else {"all": loaded}
    out = {}
    for split, ds in parts.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"{path} ({split} split): no column {missing[0]!r}; columns present: {ds.column_names}")
        out[SPLIT_NAMES.get(split, split)] = ds.select_columns(columns).to_list()
    return out


def read_labeled_splits(source: str, columns: list[str]) -> dict[str, list[dict]]:
    """Records per given split ("train"/"val"/"test"), or {"all": records} when the source has no splits.

    A folder whose files are named train.*, validation.* / val.* / dev.*, test.* gives those splits.
    """
    if source == "bbc_news":
        records = read_bbc_news()
        missing = [c for c in columns if c not in records[0]]
        if missing:
            raise DataError(f"data.source=bbc_news: no column {missing[0]!r}; columns present: {sorted(records[0])}")
        return {"all": records}
    path = resolve_path(source)
    if is_hf_dataset(path):
        return read_hf_dataset(path, columns)
    files = resolve_files(source)
    split_of = {f: SPLIT_NAMES.get(f.stem.lower()) for f in files}
    if path.is_dir() and all(split_of.values()):
        out: dict[str, list[dict]] = {}
        for f, split in split_of.items():
            out.setdefault(split, []).extend(read_records(str(f), columns))
        return out
    return {"all": read_records(source, columns)}


def fingerprint(source: str) -> list:
    path = resolve_path(source)
    if source != "bbc_news" and is_hf_dataset(path):
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return source_fingerprint(source)


def label_order(name: str) -> tuple:
    """Numbers in numeric order ("2" before "10"), then names alphabetically."""
    try:
        return (0, float(name), name)
    except ValueError:
        return (1, 0.0, name)


def add_template(tok: Tokenizer, template: str | None, pair_template: str | None) -> None:
    """Give a tokenizer without a post-processor (our BPE) its special-token framing, e.g. `<cls> $A <sep>`."""
    if tok.post_processor is not None or not template:
        return
    specials = {
        piece.split(":")[0]
        for piece in f"{template} {pair_template or ''}".split()
        if not piece.startswith("$")
    }
    ids = {}
    for token in specials:
        idx = tok.token_to_id(token)
        if idx is None:
            raise DataError(f"data.template: the tokenizer has no {token!r} token")
        ids[token] = idx
    pair = {"pair": pair_template} if pair_template else {}
    tok.post_processor = TemplateProcessing(single=template, special_tokens=sorted(ids.items()), **pair)


class TokenizedExamples(Dataset):
    """Ragged token ids (flat array + offsets) with labels; one example per item."""

    def __init__(self, arrays: dict[str, np.ndarray], keep: np.ndarray | None = None) -> None:
        self.a = arrays
        self.index = np.arange(len(arrays["labels"])) if keep is None else keep

    def __len__(self) -> int:
        return len(self.index)

    def labels(self) -> np.ndarray:
        return self.a["labels"][self.index]

    def __getitem__(self, i: int) -> dict:
        j = self.index[i]
        start, end = self.a["offsets"][j], self.a["offsets"][j + 1]
        item = {"input_ids": torch.from_numpy(self.a["ids"][start:end].astype(np.int64)),
                "labels": torch.tensor(self.a["labels"][j])}
        if "type_ids" in self.a:
            item["token_type_ids"] = torch.from_numpy(self.a["type_ids"][start:end].astype(np.int64))
        return item


class PadCollate:
    """Pad a list of examples to the longest one (right padding) and build the attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(it["input_ids"]) for it in items)
        batch = {"input_ids": torch.full((len(items), T), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros(len(items), T, dtype=torch.long)}
        if "token_type_ids" in items[0]:
            batch["token_type_ids"] = torch.zeros(len(items), T, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            batch["input_ids"][i, :n] = it["input_ids"]
            batch["attention_mask"][i, :n] = 1
            if "token_type_ids" in it:
                batch["token_type_ids"][i, :n] = it["token_type_ids"]
        batch["labels"] = torch.stack([it["labels"] for it in items])
        return batch


class LabeledTextDataModule(L.LightningDataModule):
    """Texts (optionally pairs) with a class or a number per row, for sequence classification or regression.

    Splits: the source's own train/val/test where it has them, else a stratified, seeded split. Few labels:
    `label_fraction` or `labels_per_class` subsample the training split only (stratified, seeded).
    """

    def __init__(
        self,
        source: str = "bbc_news",
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        max_length: int = 256,
        template: str | None = None,
        pair_template: str | None = None,
        regression: bool | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        label_fraction: float | None = None,
        labels_per_class: int | None = None,
        seed: int = 1234,
        label_seed: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__()
        self.source, self.tokenizer_path = str(source), tokenizer
        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.vocab_size_wanted, self.max_length = vocab_size, max_length
        self.template, self.pair_template, self.regression = template, pair_template, regression
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.label_fraction, self.labels_per_class = label_fraction, labels_per_class
        # Few-label draws can vary while the train/val/test split (seed) stays fixed, as in a multi-seed study.
        self.label_seed = seed if label_seed is None else label_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache_root = Path(cache_dir).expanduser()
        self.tokenizer: Tokenizer | None = None
        self.meta: dict = {}
        self.datasets: dict[str, TokenizedExamples] = {}

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.text_column, self.text_pair_column, self.label_column) if c]

    @property
    def cache_path(self) -> Path:
        spec = {
            "version": CACHE_VERSION,
            "source": fingerprint(self.source),
            "columns": self.columns,
            "tokenizer": tokenizer_fingerprint(self.tokenizer_path) if self.tokenizer_path else self.vocab_size_wanted,
            "max_length": self.max_length,
            "template": [self.template, self.pair_template],
            "regression": self.regression,
            "split": [self.val_fraction, self.test_fraction, self.seed],
        }
        return self.cache_root / f"labeled-{cache_key(spec)}"

    def clean(self, records: list[dict], split: str) -> list[dict]:
        """Drop rows with empty text or no label, with a warning that counts them."""
        def ok(r: dict) -> bool:
            texts = [r[self.text_column]] + ([r[self.text_pair_column]] if self.text_pair_column else [])
            return all(t is not None and str(t).strip() for t in texts) and r[self.label_column] not in (None, "")

        kept = [r for r in records if ok(r)]
        if len(kept) < len(records):
            log.warning(
                "Dropped %d of %d rows of the %s split of %s: empty %r text or no %r label",
                len(records) - len(kept), len(records), split, self.source, self.text_column, self.label_column,
            )
        return kept

    def split(self, parts: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """The given splits, with the missing ones cut (stratified, seeded) from the training data."""
        if "all" in parts:
            parts = {"train": deduplicate(parts.pop("all"), self.text_column), **parts}
        if "train" not in parts:
            raise DataError(f"data.source={self.source}: no training split (found {sorted(parts)})")
        want = [s for s in ("val", "test") if s not in parts]
        if want:
            train = parts["train"]
            fractions = {"val": self.val_fraction, "test": self.test_fraction}
            strata = [0] * len(train) if self.is_regression(train) else [str(r[self.label_column]) for r in train]
            cut = stratified_split(strata, [fractions[s] for s in want], self.seed)
            parts = {**parts, "train": [train[i] for i in cut[0]]}
            for s, idx in zip(want, cut[1:], strict=True):
                parts[s] = [train[i] for i in idx]
        rng = np.random.default_rng(self.seed)
        for s in SPLITS:
            if not parts[s]:
                raise DataError(f"data.source={self.source}: the {s} split is empty; use more data or other fractions")
            # Mixed classes in every stretch, so limit_val_batches sees them all.
            parts[s] = [parts[s][i] for i in rng.permutation(len(parts[s]))]
        return parts

    def is_regression(self, records: list[dict]) -> bool:
        if self.regression is not None:
            return bool(self.regression)
        return all(isinstance(r[self.label_column], float) for r in records)

    def encode_labels(self, parts: dict[str, list[dict]]) -> tuple[dict[str, np.ndarray], list[str] | None]:
        if self.is_regression(parts["train"]):
            out = {}
            for s in SPLITS:
                try:
                    out[s] = np.array([float(r[self.label_column]) for r in parts[s]], dtype=np.float32)
                except (TypeError, ValueError) as err:
                    raise DataError(f"data.label_column={self.label_column!r}: not a number in {s} ({err})") from err
            return out, None
        names = sorted({str(r[self.label_column]) for r in parts["train"]}, key=label_order)
        ids = {n: i for i, n in enumerate(names)}
        out = {}
        for s in SPLITS:
            unseen = sorted({str(r[self.label_column]) for r in parts[s]} - ids.keys())
            if unseen:
                raise DataError(
                    f"data.source={self.source}: label(s) {unseen} in the {s} split never occur in the training "
                    f"split (column {self.label_column!r}; training labels: {names})"
                )
            out[s] = np.array([ids[str(r[self.label_column])] for r in parts[s]], dtype=np.int64)
        return out, names

    def load_or_train_tokenizer(self, train: list[dict]) -> Tokenizer:
        if self.tokenizer_path:
            tok = load_tokenizer(self.tokenizer_path)
        else:
            texts = [str(r[c]) for r in train for c in (self.text_column, self.text_pair_column) if c]
            tok = train_bpe(texts, self.vocab_size_wanted)
        tok.no_padding()
        tok.enable_truncation(self.max_length)
        add_template(tok, self.template, self.pair_template)
        return tok

    def encode(self, tok: Tokenizer, records: list[dict]) -> dict[str, np.ndarray]:
        texts = [str(r[self.text_column]) for r in records]
        if self.text_pair_column:
            encs = tok.encode_batch(list(zip(texts, [str(r[self.text_pair_column]) for r in records], strict=True)))
        else:
            encs = tok.encode_batch(texts)
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        arrays = {
            "ids": np.fromiter((i for e in encs for i in e.ids), dtype=np.int32, count=int(lengths.sum())),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]),
        }
        if self.text_pair_column:
            arrays["type_ids"] = np.fromiter((i for e in encs for i in e.type_ids), dtype=np.int8)
        return arrays

    def prepare_data(self) -> None:
        """Read, clean, split and tokenize into the cache unless an identical cache exists."""
        final = self.cache_path
        if (final / "meta.json").is_file():
            log.info("Reusing labeled-data cache %s", final)
            return
        log.info("Tokenizing %s into %s", self.source, final)
        parts = read_labeled_splits(self.source, self.columns)
        parts = self.split({s: self.clean(r, s) for s, r in parts.items()})
        labels, names = self.encode_labels(parts)
        tok = self.load_or_train_tokenizer(parts["train"])
        meta = {
            "source": self.source,
            "labels": names,
            "regression": names is None,
            "examples": {s: len(parts[s]) for s in SPLITS},
            "vocab_size": tok.get_vocab_size(),
        }
        with publish(final, meta) as tmp:
            tok.save(str(tmp / "tokenizer.json"))
            for s in SPLITS:
                np.savez(tmp / f"{s}.npz", labels=labels[s], **self.encode(tok, parts[s]))
        log.info("Labeled data: %s examples, labels %s", meta["examples"], names)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        path = self.cache_path
        if not (path / "meta.json").is_file():
            self.prepare_data()
        self.meta = json.loads((path / "meta.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        arrays = {s: dict(np.load(path / f"{s}.npz")) for s in SPLITS}
        train_labels = arrays["train"]["labels"]
        if self.meta["regression"] and self.labels_per_class is not None:
            raise DataError("data.labels_per_class needs class labels; use data.label_fraction for regression")
        strata = np.zeros(len(train_labels)) if self.meta["regression"] else train_labels
        keep = few_label_indices(strata, self.label_fraction, self.labels_per_class, self.label_seed)
        self.datasets = {
            "train": TokenizedExamples(arrays["train"], keep),
            "val": TokenizedExamples(arrays["val"]),
            "test": TokenizedExamples(arrays["test"]),
        }
        if len(keep) < len(train_labels):
            log.info("Few labels: training on %d of %d labeled examples", len(keep), len(train_labels))

    @property
    def num_labels(self) -> int:
        self.setup()
        return 1 if self.meta["regression"] else len(self.meta["labels"])

    def model_overrides(self) -> dict:
        """Model config fields that the data decides."""
        self.setup()
        return {"vocab_size": self.tokenizer.get_vocab_size()}

    def task_overrides(self) -> dict:
        """Task arguments that the data decides."""
        return {"num_labels": self.num_labels}

    def extra_state(self) -> dict:
        """What a checkpoint must carry to be used without this data module: tokenizer, label names."""
        self.setup()
        return {"tokenizer": self.tokenizer.to_str(), "labels": self.meta["labels"],
                "regression": self.meta["regression"]}

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        pad = find_token(self.tokenizer, PAD_TOKENS)
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
            collate_fn=PadCollate(pad if pad is not None else 0),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        # Seeded, rank-sharded and resumable mid-epoch (fmlab/data/resumable.py); few labels: keep every example.
        pad = find_token(self.tokenizer, PAD_TOKENS)
        return resumable_loader(
            self.datasets["train"], self.batch_size, shuffle=True, seed=self.seed, drop_last=False,
            num_workers=self.num_workers, trainer=self.trainer, collate_fn=PadCollate(pad if pad is not None else 0),
        )

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")
