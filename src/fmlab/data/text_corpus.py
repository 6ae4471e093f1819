"""Unlabeled text for language-model pre-training: tokenize once, cache as a memory map, serve windows."""

from __future__ import annotations

import json
import logging
from itertools import chain
from pathlib import Path

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from fmlab.data.cache import cache_key, publish
from fmlab.data.resumable import resumable_loader
from fmlab.data.sources import DataError, read_texts, source_fingerprint
from fmlab.data.tokenizer import EOS, load_tokenizer, token_id, tokenizer_fingerprint, train_bpe

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded document-level split -> (train indices, val indices), both sorted."""
    if n < 2:
        raise DataError(f"the corpus has {n} document(s); at least 2 are needed for a train/val split")
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def write_tokens(tok: Tokenizer, texts: list[str], path: Path) -> int:
    """Encode `texts`, join them with EOS separators and write one flat token file; returns its length."""
    eos = token_id(tok, EOS)
    ids = (enc.ids + [eos] for enc in tok.encode_batch(texts, add_special_tokens=False))
    dtype = np.uint16 if tok.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
    tokens = np.fromiter(chain.from_iterable(ids), dtype=dtype)
    tokens.tofile(path)
    return len(tokens)


class PackedWindows(Dataset):
    """Non-overlapping windows of `block_size + 1` tokens from a flat token memmap (input + shifted target)."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self.n = (len(tokens) - 1) // block_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        start = i * self.block_size
        return torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))


class TextCorpusDataModule(L.LightningDataModule):
    """A text corpus (preset, file, folder or glob) packed into `block_size` windows for LM pre-training."""

    def __init__(
        self,
        source: str = "bbc_news",
        text_column: str = "text",
        tokenizer: str | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        val_fraction: float = 0.05,
        seed: int = 1234,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__()
        self.source, self.text_column, self.tokenizer_path = str(source), text_column, tokenizer
        self.vocab_size_wanted, self.block_size = vocab_size, block_size
        self.val_fraction, self.seed = val_fraction, seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache_root = Path(cache_dir).expanduser()
        self.tokenizer: Tokenizer | None = None
        self.train_set: PackedWindows | None = None
        self.val_set: PackedWindows | None = None

    @property
    def cache_path(self) -> Path:
        """Cache folder keyed by everything that changes the tokens: source bytes, tokenizer, split."""
        spec = {
            "version": CACHE_VERSION,
            "source": source_fingerprint(self.source),
            "text_column": self.text_column,
            "tokenizer": tokenizer_fingerprint(self.tokenizer_path) if self.tokenizer_path else self.vocab_size_wanted,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }
        return self.cache_root / f"corpus-{cache_key(spec)}"

    def prepare_data(self) -> None:
        """Tokenize the corpus into the cache unless an identical cache exists."""
        final = self.cache_path
        if (final / "meta.json").is_file():
            log.info("Reusing token cache %s", final)
            return
        log.info("Tokenizing %s into %s", self.source, final)
        texts = read_texts(self.source, self.text_column)
        train_idx, val_idx = split_documents(len(texts), self.val_fraction, self.seed)
        train_texts = [texts[i] for i in train_idx]
        if self.tokenizer_path:
            tok = load_tokenizer(self.tokenizer_path)
        else:
            tok = train_bpe(train_texts, self.vocab_size_wanted)
        meta = {
            "source": self.source,
            "documents": {"train": len(train_idx), "val": len(val_idx)},
            "dtype": "uint16" if tok.get_vocab_size() <= 65536 else "uint32",
            "vocab_size": tok.get_vocab_size(),
        }
        with publish(final, meta) as tmp:
            tok.save(str(tmp / "tokenizer.json"))
            meta["tokens"] = {
                "train": write_tokens(tok, train_texts, tmp / "train.bin"),
                "val": write_tokens(tok, [texts[i] for i in val_idx], tmp / "val.bin"),
            }
        log.info("Token cache: %s train / %s val tokens", meta["tokens"]["train"], meta["tokens"]["val"])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        path = self.cache_path
        meta = json.loads((path / "meta.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        splits = {}
        for split in ("train", "val"):
            tokens = np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r")
            splits[split] = PackedWindows(tokens, self.block_size)
            if len(splits[split]) == 0:
                raise DataError(
                    f"data.source={self.source}: the {split} split has {len(tokens)} tokens, fewer than "
                    f"data.block_size+1={self.block_size + 1}; lower data.block_size or use more text"
                )
        self.train_set, self.val_set = splits["train"], splits["val"]

    @property
    def vocab_size(self) -> int:
        self.setup()
        return self.tokenizer.get_vocab_size()

    def model_overrides(self) -> dict:
        """Model config fields that the data decides."""
        return {"vocab_size": self.vocab_size}

    def extra_state(self) -> dict:
        """What a checkpoint must carry to be used without this data module."""
        self.setup()
        return {"tokenizer": self.tokenizer.to_str()}

    def train_dataloader(self) -> DataLoader:
        # Seeded, rank-sharded and resumable mid-epoch without replaying batches (fmlab/data/resumable.py).
        return resumable_loader(
            self.train_set, self.batch_size, shuffle=True, seed=self.seed,
            drop_last=len(self.train_set) >= self.batch_size, num_workers=self.num_workers, trainer=self.trainer,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    test_dataloader = val_dataloader
