"""Byte-level BPE tokenizers: trained on the training split with HF `tokenizers`, or loaded from disk."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fmlab.data.sources import DataError

EOS = "<|endoftext|>"
# One set for every objective, so a tokenizer trained for GPT also serves BERT-style masking.
SPECIAL_TOKENS = [EOS, "<pad>", "<cls>", "<sep>", "<mask>"]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with the fmlab special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json` file, or a folder that holds one (an fmlab run or a Hugging Face model folder)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"data.tokenizer: no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"data.tokenizer: {file} is not a valid tokenizer.json ({err})") from err


def tokenizer_fingerprint(path: str) -> str:
    """Hash of a tokenizer file's bytes, for cache keys."""
    file = Path(path).expanduser()
    file = file / "tokenizer.json" if file.is_dir() else file
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else "missing"


def token_id(tok: Tokenizer, token: str) -> int:
    """Id of a special token, with an error naming it when the tokenizer lacks it."""
    idx = tok.token_to_id(token)
    if idx is None:
        raise DataError(f"the tokenizer has no {token!r} token")
    return idx
