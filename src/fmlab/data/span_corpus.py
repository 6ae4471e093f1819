"""Packed text windows for T5's span corruption: `TextCorpusDataModule` whose tokenizer also has T5's sentinel
tokens `<extra_id_0>`, `<extra_id_1>`, ... (appended after the trained vocabulary, as T5's extra ids; a tokenizer
that has them, such as T5's own, keeps its ids). The cached token windows are those of the plain corpus: sentinels
never occur in text, so adding them changes no cached id."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from fmlab.data.base import DataInfo
from fmlab.data.sources import DataError
from fmlab.data.text_corpus import TextCorpusDataModule
from fmlab.data.tokenizer import find_token

SENTINEL = "<extra_id_{}>"
PAD_TOKENS = ("<pad>", "[PAD]")


def sentinel_tokens(n: int) -> list[str]:
    return [SENTINEL.format(i) for i in range(n)]


def add_sentinels(tok: Tokenizer, n: int) -> Tokenizer:
    """Add `n` sentinel tokens as special tokens (those it already has keep their ids); returns `tok`."""
    missing = [t for t in sentinel_tokens(n) if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tok


def sentinel_ids(tok: Tokenizer, n: int | None = None) -> list[int]:
    """Ids of `<extra_id_0>`, `<extra_id_1>`, ... in order: the first `n`, or as many as the tokenizer has."""
    ids = []
    while n is None or len(ids) < n:
        idx = tok.token_to_id(SENTINEL.format(len(ids)))
        if idx is None:
            break
        ids.append(idx)
    if n is not None and len(ids) < n:
        raise DataError(f"the tokenizer has {len(ids)} sentinel tokens ({SENTINEL.format('i')}); {n} are needed")
    return ids


def decoder_start_id(tok: Tokenizer) -> int:
    """T5 starts decoding from the pad token; a tokenizer without one starts from id 0."""
    pad = find_token(tok, PAD_TOKENS)
    return 0 if pad is None else pad


class SpanCorpusDataModule(TextCorpusDataModule):
    """A text corpus packed into `block_size` windows (T5's span corruption corrupts them per batch, see
    fmlab/tasks/span_corruption.py); `num_sentinels` sentinel tokens are added to the tokenizer."""

    def __init__(
        self,
        source: str = "bbc_news",
        text_column: str = "text",
        tokenizer: str | Tokenizer | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        num_sentinels: int = 100,
        val_fraction: float = 0.05,
        seed: int = 1234,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(source, text_column, tokenizer, vocab_size, block_size, val_fraction, seed, batch_size,
                         num_workers, cache_dir)
        if num_sentinels < 1:
            raise DataError(f"data.num_sentinels={num_sentinels} must be at least 1")
        self.num_sentinels = num_sentinels

    def load(self, folder: Path, meta: dict) -> None:
        super().load(folder, meta)
        add_sentinels(self.tokenizer, self.num_sentinels)

    def describe(self) -> DataInfo:
        info = super().describe()
        info.model["decoder_start_id"] = decoder_start_id(self.tokenizer)
        return info
