"""Byte-level BPE tokenizers: trained on the training split with HF `tokenizers`, or loaded from disk."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from functools import cached_property

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fmlab.data.sources import DataError
from fmlab.resolve import tokenizer_json

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
    """A `tokenizer.json` file, a folder that holds one (an fmlab run or a Hugging Face model folder), any
    pretrained source (`.ckpt`, run folder, `pkg://...`, Hub name: fmlab.resolve), as `data.tokenizer`."""
    text = tokenizer_json(str(path), "data.tokenizer")
    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"data.tokenizer: {path} is not a valid tokenizer.json ({err})") from err


def as_tokenizer(tokenizer: str | Tokenizer) -> Tokenizer:
    """`data.tokenizer` as an object: one handed in (from a pretrained checkpoint) as is, a source loaded."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)


def tokenizer_hash(tok: Tokenizer) -> str:
    """Hash of a tokenizer's JSON, for cache keys: the same tokenizer from a file, a checkpoint or an object
    shares a cache, and a different one never does."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def special_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens (padding, [CLS], <mask>, end of text...)."""
    return sorted(i for i, added in tok.get_added_tokens_decoder().items() if added.special)


def find_token(tok: Tokenizer, candidates: tuple[str, ...]) -> int | None:
    """Id of the first of `candidates` the tokenizer knows (our `<pad>` or BERT's `[PAD]`...)."""
    return next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)


def token_id(tok: Tokenizer, token: str) -> int:
    """Id of a special token, with an error naming it when the tokenizer lacks it."""
    idx = tok.token_to_id(token)
    if idx is None:
        raise DataError(f"the tokenizer has no {token!r} token")
    return idx


class TokenizerSource:
    """For text data modules: the tokenizer handed in (`tokenizer_source`: a path, a source or an object) and the
    cache-key part it gives; without one, a BPE of `vocab_size_wanted` is trained on the training split."""

    tokenizer_source: str | Tokenizer | None
    vocab_size_wanted: int

    @cached_property
    def given_tokenizer(self) -> Tokenizer | None:
        """The tokenizer handed in, loaded once from its source; None when one is trained."""
        return None if self.tokenizer_source is None else as_tokenizer(self.tokenizer_source)

    def tokenizer_key(self) -> str | dict:
        given = self.given_tokenizer
        return tokenizer_hash(given) if given is not None else {"bpe_vocab_size": self.vocab_size_wanted}
