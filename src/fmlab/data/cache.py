"""Prepared-data caches: one folder per key, built by one process at a time, published whole or not at all."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def cache_key(spec: dict) -> str:
    """A short hash of everything that changes the cached content."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def locked(final: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<final>.lock`, beside the cache folder, for the block.

    Processes that share a cache (DDP ranks, sweep jobs) then build a key one at a time; the lock file is kept,
    because unlinking it would let a third process lock a fresh file while the second still waits on the old one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(f"{final.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process to finish %s", final)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def publish(final: Path, meta: dict) -> Iterator[Path]:
    """Yield a scratch folder beside `final`; after the block, write `meta` to `meta.json` and rename the folder to
    `final` in one step, so readers see a whole cache or none. A failed build leaves nothing behind; when another
    process published the same key first, its (identical) cache is kept."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
