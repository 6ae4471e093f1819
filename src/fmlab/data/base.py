"""The data-module base: expensive preparation cached once under a key, `prepare_data` / `setup` done once, and
one `describe()` that says what the data decides for the rest of a run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from fmlab.data.cache import cache_key, locked, publish
from fmlab.data.resumable import resumable_loader


@dataclass
class DataInfo:
    """What a data module tells the rest of a run, so the runner asks once instead of probing attributes."""

    model: dict[str, Any] = field(default_factory=dict)
    """Model config fields the data decides: `vocab_size` for text; `in_chans`, `img_size` for images."""
    task: dict[str, Any] = field(default_factory=dict)
    """Task constructor arguments the data decides: `num_labels` for labeled data, else empty."""
    state: dict[str, Any] = field(default_factory=dict)
    """What a checkpoint must carry to be used without this data module: `tokenizer` (JSON string), `labels`,
    `regression`, `normalization`, `image_shape`, as far as the data has them."""
    tokenizer: Tokenizer | None = None
    """The run's tokenizer object (saved beside the run); None for images."""
    max_length: int | None = None
    """Longest sequence the data feeds the model (labeled text: `max_length`, a corpus: `block_size`); None for
    images."""


class CachedDataModule(L.LightningDataModule):
    """The skeleton every fmlab data module shares: a cache folder keyed by `cache_spec()`, built once by
    `build_cache` under a lock (other processes wait, then reuse it), loaded once by `load`, described by
    `describe`.

    Subclasses set `cache_prefix` and define the four hooks; they never touch `meta.json`, the lock or the
    scratch folder. Bump `cache_version` when the cached format changes.
    """

    cache_prefix: str = "data"  # first part of the cache folder's name
    cache_title: str = "data"  # what the log calls the cache ("Reusing token cache ...")
    cache_version: int = 1

    def __init__(
        self, cache_dir: str = "~/.cache/fmlab", batch_size: int = 32, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        self.cache_root = Path(cache_dir).expanduser()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._loaded = False

    @property
    def log(self) -> logging.Logger:
        # The subclass's module logger, so its messages keep the name users and tests filter on.
        return logging.getLogger(type(self).__module__)

    # ---- hooks ------------------------------------------------------------------------------------------------

    def cache_spec(self) -> dict:
        """Everything that changes the cached content (source fingerprint, tokenizer hash, split...)."""
        raise NotImplementedError

    def build_cache(self, folder: Path) -> dict:
        """Write the cache's files into the scratch `folder`; return the meta dict (saved as `meta.json`)."""
        raise NotImplementedError

    def load(self, folder: Path, meta: dict) -> None:
        """Build the datasets from a published cache folder."""
        raise NotImplementedError

    def describe(self) -> DataInfo:
        """What the data decides for the model, the task and the checkpoint (sets the module up first)."""
        raise NotImplementedError

    # ---- the skeleton -----------------------------------------------------------------------------------------

    @property
    def cache_path(self) -> Path:
        """`<cache_dir>/<cache_prefix>-<key>`, the key a hash of `cache_spec()` and the cache version."""
        key = cache_key({"version": self.cache_version, **self.cache_spec()})
        return self.cache_root / f"{self.cache_prefix}-{key}"

    def prepare_data(self) -> None:
        """Build the cache unless an identical one exists; one process builds, any other waits and reuses it."""
        final = self.cache_path
        if (final / "meta.json").is_file():
            self.log.info("Reusing %s cache %s", self.cache_title, final)
            return
        with locked(final):
            if (final / "meta.json").is_file():  # built by the process we waited for
                self.log.info("Reusing %s cache %s", self.cache_title, final)
                return
            self.log.info("Preparing %s cache %s", self.cache_title, final)
            meta: dict = {}
            with publish(final, meta) as tmp:
                meta.update(self.build_cache(tmp))

    def setup(self, stage: str | None = None) -> None:
        """Load the datasets from the cache (preparing it first where it is missing), once."""
        if self._loaded:
            return
        folder = self.cache_path
        if not (folder / "meta.json").is_file():
            self.prepare_data()
        self.load(folder, json.loads((folder / "meta.json").read_text()))
        self._loaded = True

    # ---- loaders ----------------------------------------------------------------------------------------------

    def train_loader(self, dataset: Dataset, drop_last: bool, **kwargs: Any) -> DataLoader:
        """Seeded, rank-sharded and resumable mid-epoch without replaying batches (fmlab/data/resumable.py)."""
        return resumable_loader(
            dataset, self.batch_size, shuffle=True, seed=self.seed, drop_last=drop_last,
            num_workers=self.num_workers, trainer=self.trainer, **kwargs,
        )

    def eval_loader(self, dataset: Dataset, batch_size: int | None = None, **kwargs: Any) -> DataLoader:
        """In order, every example, workers kept between evaluations."""
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, **kwargs,
        )
