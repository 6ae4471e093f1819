"""English -> Spanish verse pairs from two public-domain Bibles that Debian ships as SWORD modules: the World English
Bible (`sword-text-web`) and the Reina-Valera 1909 (`sword-text-sparv`). Verses pair by book, chapter and verse
(each module's own versification, read with pysword's canon tables), never by position; OSIS markup is stripped,
footnotes and section headings dropped (a psalm's canonical title stays: the Spanish has it in the verse).

The zText files are read here (a verse index, block offsets, zlib blocks, each block inflated once): pysword's
reader inflates a whole book per verse."""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmlab.data.sources import DataError, Preset, register_preset

SWORD_ROOT = Path("/usr/share/sword")
MODULES = {"en": "engWEB2015eb", "es": "spaRV1909eb"}  # module name per language, as the packages install them
PACKAGES = "apt-get install sword-text-web sword-text-sparv; pip install pysword"
Verse = tuple[str, int, int]  # (OSIS book, chapter, verse)
MAX_LENGTH_RATIO = 3.0  # Spanish / English characters of a verse pair; 99.9 % of pairs are within 0.5-2.1

NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)
DIV = re.compile(r"<div\b[^>]*>")
TITLE = re.compile(r"<title\b([^>]*)>(.*?)</title>", re.DOTALL)
SPACING_TAG = re.compile(r"</?(?:l|lg|lb|p|div|milestone|item|list|speaker)\b[^>]*>")
TAG = re.compile(r"<[^>]+>")
SPACE_BEFORE = re.compile(r"\s+([,.;:!?’”)\]])")
SPACE_AFTER = re.compile(r"([¿¡“‘(\[])\s+")


def clean_osis(text: str) -> str:
    """OSIS verse markup -> plain text: what follows the end of a book (the WEB's glossary after Revelation 22:21),
    notes and non-canonical titles dropped, tags removed (a space where a tag separates words or lines), entities
    decoded, spacing normalised."""
    end = next((m.start() for m in DIV.finditer(text) if 'type="book"' in m.group(0) and "eID=" in m.group(0)
                or 'type="glossary"' in m.group(0) or 'type="introduction"' in m.group(0)), None)
    text = NOTE.sub(" ", text[:end])
    text = TITLE.sub(lambda m: f" {m.group(2)} " if 'canonical="true"' in m.group(1) else " ", text)
    text = TAG.sub("", SPACING_TAG.sub(" ", text))
    text = " ".join(html.unescape(text).split())
    return SPACE_AFTER.sub(r"\1", SPACE_BEFORE.sub(r"\1", text))


def module_conf(name: str, root: Path = SWORD_ROOT) -> dict[str, str]:
    """`mods.d/<name>.conf` as key -> first value."""
    path = root / "mods.d" / f"{name}.conf"
    if not path.is_file():
        raise DataError(f"data.source=bible_en_es: no SWORD module {name} ({path}); install it: {PACKAGES}")
    conf: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            conf.setdefault(key.strip().lower(), value.strip())
    return conf


def module_folder(name: str, root: Path = SWORD_ROOT) -> Path:
    return root / module_conf(name, root)["datapath"].removeprefix("./")


def bible_files(root: Path = SWORD_ROOT, **_: Any) -> list[Path]:
    """The files that make the preset: each module's conf and its zText files."""
    files = []
    for name in MODULES.values():
        files.append(root / "mods.d" / f"{name}.conf")
        files += sorted(module_folder(name, root).glob("*.bz?"))
    return files


class ZTextTestament:
    """One testament of a zText module: `text(index)` is the raw markup of verse record `index`."""

    def __init__(self, folder: Path, testament: str) -> None:
        self.index = (folder / f"{testament}.bzv").read_bytes()  # per verse: block, start, length (<IIH)
        self.blocks = (folder / f"{testament}.bzs").read_bytes()  # per block: offset, size, inflated size (<III)
        self.data = (folder / f"{testament}.bzz").read_bytes()
        self.inflated: dict[int, bytes] = {}

    def text(self, index: int) -> str:
        if 10 * (index + 1) > len(self.index):
            return ""
        block, start, length = struct.unpack_from("<IIH", self.index, 10 * index)
        if length == 0:
            return ""
        if block not in self.inflated:
            offset, size, _ = struct.unpack_from("<III", self.blocks, 12 * block)
            self.inflated = {block: zlib.decompress(self.data[offset : offset + size])}  # verses come in order
        return self.inflated[block][start : start + length].decode("utf-8", errors="replace")


def read_module(name: str, root: Path = SWORD_ROOT) -> Iterator[tuple[Verse, str]]:
    """((book, chapter, verse), raw markup) of every verse a zText module has, in canon order."""
    try:
        from pysword.books import BibleStructure
    except ImportError as err:
        raise DataError(f"data.source=bible_en_es reads the modules' versification with pysword: {PACKAGES}") from err
    conf = module_conf(name, root)
    if conf.get("moddrv", "").lower() != "ztext" or conf.get("cipherkey"):
        raise DataError(f"{root / 'mods.d' / name}.conf: only unencrypted zText modules are read")
    folder, structure = module_folder(name, root), BibleStructure(conf.get("versification", "KJV").lower())
    for testament, books in structure.get_books().items():
        if not (folder / f"{testament}.bzv").is_file():
            continue
        reader = ZTextTestament(folder, testament)
        for book in books:
            for chapter in range(1, book.num_chapters + 1):
                indices = structure.ref_to_indicies(books=[book.name], chapters=[chapter])[testament]
                for verse, index in enumerate(indices, 1):
                    yield (book.osis_name, chapter, verse), reader.text(index)


def read_bible_pairs(root: Path = SWORD_ROOT) -> list[dict[str, Any]]:
    """{"source": English, "target": Spanish, "ref": "John 3:16", "book"} for every verse both have text for (31,062
    of the 31,102 verses of the KJV canon)."""
    spanish = {key: clean_osis(text) for key, text in read_module(MODULES["es"], root) if text}
    pairs = []
    for (book, chapter, verse), text in read_module(MODULES["en"], root):
        english, target = clean_osis(text) if text else "", spanish.get((book, chapter, verse), "")
        # A length ratio beyond 3 is a versification mismatch (KJV's Job 39:30 holds the Hebrew 39:30-35).
        if english and target and 1 / MAX_LENGTH_RATIO <= len(target) / len(english) <= MAX_LENGTH_RATIO:
            pairs.append({"source": english, "target": target, "ref": f"{book} {chapter}:{verse}", "book": book})
    if not pairs:
        raise DataError(f"data.source=bible_en_es: no verse pairs under {root}; reinstall: {PACKAGES}")
    return pairs


register_preset(Preset("bible_en_es", "text", read=lambda: {"all": read_bible_pairs()}, files=bible_files))
