"""Labeled text for fine-tuning: read, split, tokenize once into a cache, sample few labels, pad per batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from torch.utils.data import DataLoader, Dataset

from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.sampling import VAL_LABELS, complete_splits, few_label_indices, few_label_val_indices
from fmlab.data.sources import DataError, deduplicate, fingerprint, read_split_table
from fmlab.data.tokenizer import TokenizerSource, find_token, train_bpe
from fmlab.errors import check_choice

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
PAD_TOKENS = ("<pad>", "[PAD]")


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


class PaddedSplits:
    """Loaders of `self.datasets` ("train", "val", "test"), batches padded by `collate_class(<pad id>)` with the
    tokenizer's pad token (our `<pad>` or BERT's `[PAD]`, else 0); training keeps every example (no drop_last:
    few labels). Shared by the labeled-text, tagged-token and question-answering modules."""

    collate_class: type = PadCollate
    datasets: dict[str, Dataset]
    tokenizer: Tokenizer | None

    def collate(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        pad = find_token(self.tokenizer, PAD_TOKENS)
        return self.collate_class(pad if pad is not None else 0)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.datasets["train"], drop_last=False, collate_fn=self.collate())

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.datasets["val"], collate_fn=self.collate())

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.datasets["test"], collate_fn=self.collate())


class LabeledTextDataModule(PaddedSplits, TokenizerSource, CachedDataModule):
    """Texts (optionally pairs) with a class or a number per row, for sequence classification or regression.

    Splits: the source's own train/val/test where it has them, else a stratified, seeded split. Few labels:
    `label_fraction` or `labels_per_class` subsample the training split (stratified, seeded), and the validation
    split the same way unless `val_labels=all`; the test split stays whole. `tokenizer`:
    a source to load one from, a `tokenizers.Tokenizer`, or None to train a BPE on the training split.
    """

    cache_prefix, cache_title = "labeled", "labeled-data"

    def __init__(
        self,
        source: str = "bbc_news",
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        tokenizer: str | Tokenizer | None = None,
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
        val_labels: str = "matched",
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_choice("data.val_labels", val_labels, VAL_LABELS)
        self.val_labels = val_labels
        self.source, self.tokenizer_source = str(source), tokenizer
        self.text_column, self.text_pair_column, self.label_column = text_column, text_pair_column, label_column
        self.vocab_size_wanted, self.max_length = vocab_size, max_length
        self.template, self.pair_template, self.regression = template, pair_template, regression
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.label_fraction, self.labels_per_class = label_fraction, labels_per_class
        # Few-label draws can vary while the train/val/test split (seed) stays fixed, as in a multi-seed study.
        self.label_seed = seed if label_seed is None else label_seed
        self.tokenizer: Tokenizer | None = None  # the cache's (framed, truncating), after setup
        self.meta: dict = {}
        self.datasets: dict[str, TokenizedExamples] = {}

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.text_column, self.text_pair_column, self.label_column) if c]

    def cache_spec(self) -> dict:
        return {
            "source": fingerprint(self.source),
            "columns": self.columns,
            "tokenizer": self.tokenizer_key(),
            "max_length": self.max_length,
            "template": [self.template, self.pair_template],
            "regression": self.regression,
            "split": [self.val_fraction, self.test_fraction, self.seed],
        }

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

        def strata(train: list[dict]) -> list:
            return [0] * len(train) if self.is_regression(train) else [str(r[self.label_column]) for r in train]

        return complete_splits(parts, self.source, self.val_fraction, self.test_fraction, self.seed, strata)

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
        if self.given_tokenizer is not None:  # a copy: the framing and truncation below must not reach the caller's
            tok = Tokenizer.from_str(self.given_tokenizer.to_str())
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

    def build_cache(self, folder: Path) -> dict:
        """Read, clean, split and tokenize every split into the scratch folder."""
        log.info("Tokenizing %s", self.source)
        parts = read_split_table(self.source, self.columns)
        parts = self.split({s: self.clean(r, s) for s, r in parts.items()})
        labels, names = self.encode_labels(parts)
        tok = self.load_or_train_tokenizer(parts["train"])
        tok.save(str(folder / "tokenizer.json"))
        for s in SPLITS:
            np.savez(folder / f"{s}.npz", labels=labels[s], **self.encode(tok, parts[s]))
        examples = {s: len(parts[s]) for s in SPLITS}
        log.info("Labeled data: %s examples, labels %s", examples, names)
        return {
            "source": self.source,
            "labels": names,
            "regression": names is None,
            "examples": examples,
            "vocab_size": tok.get_vocab_size(),
        }

    def load(self, folder: Path, meta: dict) -> None:
        """The cached splits, the training split subsampled to the few labels asked for."""
        if meta["regression"] and self.labels_per_class is not None:
            raise DataError("data.labels_per_class needs class labels; use data.label_fraction for regression")
        arrays = {s: dict(np.load(folder / f"{s}.npz")) for s in SPLITS}
        keep = self.few_label_selection({s: arrays[s]["labels"] for s in SPLITS}, meta["regression"])
        self.meta, self.tokenizer = meta, Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.datasets = {s: TokenizedExamples(arrays[s], keep[s]) for s in SPLITS}
        n_train, n_val = len(arrays["train"]["labels"]), len(arrays["val"]["labels"])
        if len(keep["train"]) < n_train:
            log.info("Few labels: training on %d of %d labeled examples, validating on %d of %d",
                     len(keep["train"]), n_train, len(keep["val"]), n_val)

    def few_label_selection(self, labels: dict[str, np.ndarray], regression: bool) -> dict[str, np.ndarray]:
        """Indices kept per split (labels in cache order): the few training labels, the validation split drawn the
        same way (data.val_labels), the whole test split. Classic baselines read the same (experiments/)."""
        def strata(split: str) -> np.ndarray:
            return np.zeros(len(labels[split])) if regression else labels[split]

        return {
            "train": few_label_indices(strata("train"), self.label_fraction, self.labels_per_class, self.label_seed),
            "val": few_label_val_indices(strata("val"), self.label_fraction, self.labels_per_class, self.label_seed,
                                         self.val_labels),
            "test": np.arange(len(labels["test"])),
        }

    def labeled_records(self) -> dict[str, list[dict]]:
        """The cleaned records of each split in cache order, with their label ids as `label_id` (a read of the
        source, no tokenizing): what a classic baseline trains and tests on."""
        parts = read_split_table(self.source, self.columns)
        parts = self.split({s: self.clean(r, s) for s, r in parts.items()})
        labels, _ = self.encode_labels(parts)
        return {s: [{**r, "label_id": y} for r, y in zip(parts[s], labels[s].tolist(), strict=True)] for s in SPLITS}

    @property
    def num_labels(self) -> int:
        self.setup()
        return 1 if self.meta["regression"] else len(self.meta["labels"])

    def describe(self) -> DataInfo:
        self.setup()
        return DataInfo(
            model={"vocab_size": self.tokenizer.get_vocab_size()},
            task={"num_labels": self.num_labels},
            state={"tokenizer": self.tokenizer.to_str(), "labels": self.meta["labels"],
                   "regression": self.meta["regression"]},
            tokenizer=self.tokenizer,
            max_length=self.max_length,
        )
