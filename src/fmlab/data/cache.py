"""Prepared-data caches: one folder per key, published whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_key(spec: dict) -> str:
    """A short hash of everything that changes the cached content."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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
