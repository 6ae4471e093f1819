"""Unlabeled text for language-model pre-training: tokenize once, cache as a memory map, serve windows."""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.sources import DataError, fingerprint, read_texts
from fmlab.data.tokenizer import EOS, TokenizerSource, token_id, train_bpe

log = logging.getLogger(__name__)


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


class TextCorpusDataModule(TokenizerSource, CachedDataModule):
    """A text corpus (preset, file, folder, glob or saved HF dataset) packed into `block_size` windows for LM
    pre-training. `tokenizer`: a source to load one from, a `tokenizers.Tokenizer`, or None to train a BPE."""

    cache_prefix, cache_title = "corpus", "token"

    def __init__(
        self,
        source: str = "bbc_news",
        text_column: str = "text",
        tokenizer: str | Tokenizer | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        val_fraction: float = 0.05,
        seed: int = 1234,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.source, self.text_column, self.tokenizer_source = str(source), text_column, tokenizer
        self.vocab_size_wanted, self.block_size, self.val_fraction = vocab_size, block_size, val_fraction
        self.tokenizer: Tokenizer | None = None  # the cache's, after setup
        self.train_set: PackedWindows | None = None
        self.val_set: PackedWindows | None = None

    def cache_spec(self) -> dict:
        return {
            "source": fingerprint(self.source),
            "text_column": self.text_column,
            "tokenizer": self.tokenizer_key(),
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    def build_cache(self, folder: Path) -> dict:
        """Read, split by document, train or take the tokenizer, and write one flat token file per split."""
        log.info("Tokenizing %s", self.source)
        texts = read_texts(self.source, self.text_column)
        train_idx, val_idx = split_documents(len(texts), self.val_fraction, self.seed)
        train_texts = [texts[i] for i in train_idx]
        tok = self.given_tokenizer or train_bpe(train_texts, self.vocab_size_wanted)
        tok.save(str(folder / "tokenizer.json"))
        tokens = {
            "train": write_tokens(tok, train_texts, folder / "train.bin"),
            "val": write_tokens(tok, [texts[i] for i in val_idx], folder / "val.bin"),
        }
        log.info("Token cache: %s train / %s val tokens", tokens["train"], tokens["val"])
        return {
            "source": self.source,
            "documents": {"train": len(train_idx), "val": len(val_idx)},
            "dtype": "uint16" if tok.get_vocab_size() <= 65536 else "uint32",
            "vocab_size": tok.get_vocab_size(),
            "tokens": tokens,
        }

    def load(self, folder: Path, meta: dict) -> None:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        splits = {}
        for split in ("train", "val"):
            tokens = np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r")
            splits[split] = PackedWindows(tokens, self.block_size)
            if len(splits[split]) == 0:
                raise DataError(
                    f"data.source={self.source}: the {split} split has {len(tokens)} tokens, fewer than "
                    f"data.block_size+1={self.block_size + 1}; lower data.block_size or use more text"
                )
        self.tokenizer, self.train_set, self.val_set = tokenizer, splits["train"], splits["val"]

    def describe(self) -> DataInfo:
        self.setup()
        return DataInfo(
            model={"vocab_size": self.tokenizer.get_vocab_size()},
            state={"tokenizer": self.tokenizer.to_str()},
            tokenizer=self.tokenizer,
            max_length=self.block_size,
        )

    @property
    def vocab_size(self) -> int:
        return self.describe().model["vocab_size"]

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, drop_last=len(self.train_set) >= self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set)

    test_dataloader = val_dataloader
