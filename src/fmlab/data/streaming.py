"""A text corpus streamed from token shards (litdata): tokenized once, written by `litdata.optimize` as shards in a
local folder or an object store, read shard by shard in windows of `block_size + 1` tokens, sharded across ranks,
nodes and loader workers, and resumable mid-epoch from the loader's state in the checkpoint.

The memory-mapped corpus (fmlab/data/text_corpus.py) stays the default: it is simpler and as fast while the token
file fits on every node's disk. Streaming is for corpora that live in an object store (`s3://`, `gs://`, `r2://`)
or that no node should hold whole: a rank holds a few shards at a time, its disk cache is capped by
`max_cache_size`.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import sys
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request per process (offline clusters)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from litdata import TokensLoader as LitTokensLoader  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from fmlab.data.sources import DataError  # noqa: E402
from fmlab.data.text_corpus import TextCorpusDataModule  # noqa: E402

SPLITS = ("train", "val")
PIECE_TOKENS = 8192  # tokens per item written; a shard holds whole items (litdata's TokensLoader format)
WRITABLE_SCHEMES = ("s3://", "gs://", "r2://")  # what litdata.optimize uploads to
LOCAL_REMOTE = "local:"  # litdata's stand-in for an object store: a local folder read through the download cache


class TokensLoader(LitTokensLoader):  # litdata checks the loader's class name against the shards' index
    """litdata's `TokensLoader`, safe under a cache budget: the reader's thread deletes a consumed shard from the
    cache (`delete`) while the main thread closes it (`close`), and in litdata 0.2.76 both pop the same memory map
    (KeyError in `close`). One lock serialises them."""

    def __init__(self, block_size: int | None = None) -> None:
        super().__init__(block_size)
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_lock": None}  # sent to loader workers; a lock does not pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _load_chunk(self, chunk_index: int, chunk_filepath: str) -> None:
        with self._lock:
            super()._load_chunk(chunk_index, chunk_filepath)

    def close(self, chunk_index: int) -> None:
        with self._lock:
            super().close(chunk_index)

    def delete(self, chunk_index: int, chunk_filepath: str) -> None:
        with self._lock:
            super().delete(chunk_index, chunk_filepath)


def token_piece(bounds: tuple[int, int], path: str, dtype: str) -> Any:
    """litdata.optimize's function: the tokens [start, end) of the flat token file, as one item."""
    start, end = bounds
    yield np.array(np.memmap(path, dtype=dtype, mode="r")[start:end])


def tokens_per_shard(chunk_size: int | None, chunk_bytes: int | str | None, itemsize: int) -> int:
    """The shard size in tokens that `chunk_size` (tokens) or `chunk_bytes` ("64MB", bytes) asks for."""
    from litdata.utilities.format import _convert_bytes_to_int

    if (chunk_size is None) == (chunk_bytes is None):
        raise DataError(f"data.chunk_size={chunk_size}, data.chunk_bytes={chunk_bytes}: set exactly one (tokens or "
                        "bytes per shard)")
    tokens = chunk_size if chunk_size is not None else _convert_bytes_to_int(str(chunk_bytes)) // itemsize
    if tokens < 1:
        raise DataError(f"data.chunk_size / data.chunk_bytes: a shard must hold at least one token (got {tokens})")
    return int(tokens)


def shard_index(location: str) -> dict | None:
    """The litdata index (`index.json`) of the shards at `location` (a folder or a URI), None where there is none."""
    from litdata.processing.utilities import read_index_file_content
    from litdata.streaming.resolver import _resolve_dir

    return read_index_file_content(_resolve_dir(location.removeprefix(LOCAL_REMOTE)))


def write_shards(
    tokens_file: Path, dtype: str, location: str, chunk_size: int | None, chunk_bytes: int | str | None,
    workers: int = 1,
) -> int:
    """`litdata.optimize` a flat token file into token shards at `location`; returns the shard count. Shards that an
    earlier run wrote there from the same tokens (same count) are reused; others are an error."""
    from litdata import optimize

    tokens = np.memmap(tokens_file, dtype=dtype, mode="r")
    n, per_shard = len(tokens), tokens_per_shard(chunk_size, chunk_bytes, np.dtype(dtype).itemsize)
    existing = shard_index(location)
    if existing is not None:
        if sum(chunk["dim"] for chunk in existing["chunks"]) != n:
            raise DataError(f"data.output_dir: {location} already holds other token shards; choose an empty "
                            "data.output_dir or remove them")
        return len(existing["chunks"])
    piece = min(PIECE_TOKENS, per_shard)
    size = {"chunk_size": per_shard} if chunk_size is not None else {"chunk_bytes": chunk_bytes}
    optimize(
        fn=functools.partial(token_piece, path=str(tokens_file), dtype=dtype),
        inputs=[(start, min(start + piece, n)) for start in range(0, n, piece)],
        output_dir=location.removeprefix(LOCAL_REMOTE), item_loader=TokensLoader(), num_workers=workers,
        keep_data_ordered=True, verbose=False,
        start_method="fork" if sys.platform == "linux" and "fork" in mp.get_all_start_methods() else None, **size,
    )
    return len(shard_index(location)["chunks"])


def collate_tokens(windows: list[np.ndarray]) -> torch.Tensor:
    """(B, block_size + 1) int64 token ids, as the memory-mapped corpus serves them."""
    return torch.from_numpy(np.stack(windows).astype(np.int64))


def streaming_dataset(
    location: str, block_size: int, cache_dir: Path, seed: int, shuffle: bool = True, drop_last: bool = True,
    max_cache_size: int | str | None = None, max_pre_download: int = 2, ranks: tuple[int, int, int] | None = None,
) -> Any:
    """A `litdata.StreamingDataset` of the token shards at `location`: windows of `block_size + 1` tokens. `ranks`
    (world size, global rank, nodes) shards it; None: litdata's own detection (torch.distributed)."""
    from litdata import StreamingDataset
    from litdata.utilities.env import _DistributedEnv

    dataset = StreamingDataset(
        location, cache_dir=str(cache_dir), item_loader=TokensLoader(block_size=block_size + 1), shuffle=shuffle,
        drop_last=drop_last, seed=seed, max_cache_size=max_cache_size, max_pre_download=max_pre_download,
    )
    if ranks is not None and ranks[0] > 1:
        # litdata reads ranks from torch.distributed, and on CPU counts all nodes as one: take the trainer's.
        dataset.distributed_env = _DistributedEnv(*ranks)
    return dataset


def streaming_loader(dataset: Any, batch_size: int, num_workers: int = 0, drop_last: bool = True) -> Any:
    """A `litdata.StreamingDataLoader` of (B, block_size + 1) int64 batches; its `state_dict` is its position."""
    from litdata import StreamingDataLoader

    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_tokens,
                               drop_last=drop_last)


class StreamingCorpusDataModule(TextCorpusDataModule):
    """The corpus of `TextCorpusDataModule` (read, split by document, tokenized once) served from litdata token
    shards: `litdata.StreamingDataset` + `StreamingDataLoader`, batches of (B, block_size + 1) token ids.

    `output_dir`: where the shards go; null: inside the cache folder, else a folder or `s3://` / `gs://` / `r2://`
    URI (`local:<folder>` reads a folder through the download cache, as an object store is read). `chunk_size`
    (tokens) or `chunk_bytes` ("64MB"): the shard size. `max_cache_size`: the disk budget for downloaded shards
    (null: litdata's default, 75 % of the free disk). Windows do not overlap (stride `block_size + 1`) nor cross a
    shard; the tail of each shard shorter than a window is skipped.
    """

    cache_prefix, cache_title = "stream", "token shard"

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
        output_dir: str | None = None,
        chunk_size: int | None = None,
        chunk_bytes: int | str | None = "64MB",
        max_cache_size: int | str | None = None,
        max_pre_download: int = 2,
        optimize_workers: int = 1,
    ) -> None:
        super().__init__(source=source, text_column=text_column, tokenizer=tokenizer, vocab_size=vocab_size,
                         block_size=block_size, val_fraction=val_fraction, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, cache_dir=cache_dir)
        if chunk_size is not None:
            chunk_bytes = None  # data.chunk_size=<tokens> replaces the preset's chunk_bytes
        tokens_per_shard(chunk_size, chunk_bytes, 2)  # fail now on a bad size, not after tokenizing
        if output_dir and "://" in output_dir and not output_dir.startswith(WRITABLE_SCHEMES):
            raise DataError(f"data.output_dir={output_dir}: litdata writes shards to a folder or to "
                            f"{', '.join(WRITABLE_SCHEMES)} URIs only")
        self.output_dir, self.chunk_size, self.chunk_bytes = output_dir, chunk_size, chunk_bytes
        self.max_cache_size, self.max_pre_download, self.optimize_workers = (
            max_cache_size, max_pre_download, optimize_workers)
        self.shards: dict[str, str] = {}

    def cache_spec(self) -> dict:
        return {**super().cache_spec(), "output_dir": self.output_dir, "chunk_size": self.chunk_size,
                "chunk_bytes": self.chunk_bytes}

    def shard_location(self, folder: Path, split: str) -> str:
        """Where a split's shards are written: `<output_dir>/<split>`, or `<cache folder>/shards/<split>`."""
        if not self.output_dir:
            return str(folder / "shards" / split)
        if "://" in self.output_dir:
            return f"{self.output_dir.rstrip('/')}/{split}"
        local = self.output_dir.startswith(LOCAL_REMOTE)
        path = Path(self.output_dir.removeprefix(LOCAL_REMOTE)).expanduser().resolve() / split
        return f"{LOCAL_REMOTE}{path}" if local else str(path)

    def build_cache(self, folder: Path) -> dict:
        """The text corpus's tokens (one flat file per split), written as shards; the flat files are dropped."""
        meta = super().build_cache(folder)
        meta["shards"] = {}
        for split in SPLITS:
            location = self.shard_location(folder, split)
            count = write_shards(folder / f"{split}.bin", meta["dtype"], location, self.chunk_size,
                                 self.chunk_bytes, self.optimize_workers)
            (folder / f"{split}.bin").unlink()
            # Inside the cache folder: relative, since the folder is renamed into place after this.
            meta["shards"][split] = f"shards/{split}" if not self.output_dir else location
            self.log.info("Token shards (%s): %d shard(s) at %s", split, count, location)
        return meta

    def load(self, folder: Path, meta: dict) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.shards = {split: meta["shards"][split] if self.output_dir else str(folder / meta["shards"][split])
                       for split in SPLITS}
        window = self.block_size + 1
        for split, location in self.shards.items():
            index = shard_index(location)
            if index is None:
                raise DataError(f"data.output_dir: the {split} shards at {location} are gone; remove the cache "
                                f"folder {folder} to write them again")
            if sum(chunk["dim"] // window for chunk in index["chunks"]) == 0:
                raise DataError(f"data.source={self.source}: no {split} shard holds data.block_size+1={window} "
                                "tokens; lower data.block_size, raise data.chunk_size / data.chunk_bytes, or use "
                                "more text")

    def dataset(self, split: str, shuffle: bool, drop_last: bool) -> Any:
        """A `StreamingDataset` of `split`, sharded by the trainer's ranks and nodes (when one is attached)."""
        self.setup()
        trainer = getattr(self, "trainer", None)
        ranks = (trainer.world_size, trainer.global_rank, trainer.num_nodes) if trainer is not None else None
        return streaming_dataset(
            self.shards[split], self.block_size, cache_dir=self.cache_path / "downloads" / split, seed=self.seed,
            shuffle=shuffle, drop_last=drop_last, max_cache_size=self.max_cache_size,
            max_pre_download=self.max_pre_download, ranks=ranks,
        )

    def loader(self, split: str, shuffle: bool, drop_last: bool) -> Any:
        return streaming_loader(self.dataset(split, shuffle, drop_last), self.batch_size, self.num_workers, drop_last)

    def train_dataloader(self) -> Any:
        """Shuffled shard order and windows, a fresh order each epoch; Lightning checkpoints its position."""
        return self.loader("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> Any:
        return self.loader("val", shuffle=False, drop_last=False)

    test_dataloader = val_dataloader
