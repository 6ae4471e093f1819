"""Text sources, the BBC News preset, the token cache and the errors for bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from fmlab.data.sources import DataError, read_bbc_news, read_texts
from fmlab.data.text_corpus import TextCorpusDataModule, split_documents
from fmlab.errors import UserError


def test_bbc_news_preset_counts_and_topics() -> None:
    records = read_bbc_news()
    assert len(records) == 2127
    assert sorted({r["label"] for r in records}) == ["business", "entertainment", "politics", "sports", "tech"]
    assert len({r["text"] for r in records}) == 2127
    assert all(r["text"].strip() for r in records)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_tabular_sources_read_the_text_column(tmp_path: Path, suffix: str) -> None:
    rows = [{"body": f"document number {i}", "id": i} for i in range(5)] + [{"body": "document number 0", "id": 9}]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        path.write_text("body,id\n" + "\n".join(f"{r['body']},{r['id']}" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    texts = read_texts(str(path), "body")
    assert texts == [f"document number {i}" for i in range(5)]  # the duplicate is dropped


def test_folder_and_glob_sources(corpus_dir: Path) -> None:
    assert len(read_texts(str(corpus_dir))) == 60
    assert len(read_texts(str(corpus_dir / "doc00*.txt"))) == 10


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"no such file or folder: {tmp_path / 'nope'}"):
        read_texts(str(tmp_path / "nope"))


def test_empty_corpus_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match="corpus is empty"):
        read_texts(str(tmp_path / "a.jsonl"))


def test_unknown_column_names_file_column_and_columns_present(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("body,id\nhello,1\n")
    with pytest.raises(DataError) as err:
        read_texts(str(path), "text")
    assert str(path) in str(err.value) and "'text'" in str(err.value) and "['body', 'id']" in str(err.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=f"{path}: cannot read"):
        read_texts(str(path))


def test_invalid_utf8_is_replaced_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    assert read_texts(str(tmp_path)) == ["caf\ufffd au lait"]


def test_split_is_seeded_and_by_document() -> None:
    train, val = split_documents(100, 0.1, seed=3)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100
    assert np.array_equal(val, split_documents(100, 0.1, seed=3)[1])
    assert not np.array_equal(val, split_documents(100, 0.1, seed=4)[1])


def make_dm(corpus_dir: Path, cache: Path, **kw) -> TextCorpusDataModule:
    args = {"vocab_size": 300, "block_size": 32, **kw}
    return TextCorpusDataModule(source=str(corpus_dir), cache_dir=str(cache), **args)


def test_token_cache_is_written_once_and_reused(corpus_dir: Path, tmp_path: Path, caplog, monkeypatch) -> None:
    dm = make_dm(corpus_dir, tmp_path / "cache")
    dm.prepare_data()
    dm.setup()
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300
    assert dm.train_set.tokens.dtype == np.uint16 and isinstance(dm.train_set.tokens, np.memmap)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (dm.batch_size, 33)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache exists")

    monkeypatch.setattr("fmlab.data.text_corpus.write_tokens", fail)
    monkeypatch.setattr("fmlab.data.text_corpus.train_bpe", fail)
    again = make_dm(corpus_dir, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="fmlab.data.text_corpus"):
        again.prepare_data()
    assert again.cache_path == dm.cache_path
    assert "Reusing token cache" in caplog.text


def test_cache_key_follows_source_and_tokenizer(corpus_dir: Path, tmp_path: Path) -> None:
    def key(**kw) -> str:  # one root, so only the key can differ
        return make_dm(corpus_dir, tmp_path / "cache", **kw).cache_path.name

    base = key()
    assert key() == base
    assert key(val_fraction=0.2) != base
    assert key(vocab_size=400) != base
    assert key(seed=5) != base

    trained = make_dm(corpus_dir, tmp_path / "a")
    trained.setup()
    tok_file = tmp_path / "tokenizer.json"
    trained.tokenizer.save(str(tok_file))
    as_path, as_object = key(tokenizer=str(tok_file)), key(tokenizer=Tokenizer.from_file(str(tok_file)))
    assert as_path == as_object, "the same tokenizer as a path and as an object shares a cache"
    assert as_path != base, "a given tokenizer is not the one this corpus would train"
    other = make_dm(corpus_dir, tmp_path / "b", vocab_size=280)
    other.setup()
    assert other.tokenizer.to_str() != trained.tokenizer.to_str()
    assert key(tokenizer=other.tokenizer) != as_path, "a different tokenizer never shares a cache"

    (corpus_dir / "doc000.txt").write_text("changed text")
    assert key() != base
    assert key(tokenizer=str(tok_file)) != as_path


def test_existing_tokenizer_is_loaded(corpus_dir: Path, tmp_path: Path) -> None:
    first = make_dm(corpus_dir, tmp_path / "cache")
    first.setup()
    tok_file = first.cache_path / "tokenizer.json"
    for given in (str(tok_file), Tokenizer.from_file(str(tok_file))):
        second = make_dm(corpus_dir, tmp_path / "cache", tokenizer=given)
        second.setup()
        assert second.cache_path != first.cache_path
        assert second.tokenizer.to_str() == first.tokenizer.to_str()
        assert np.array_equal(second.train_set.tokens, first.train_set.tokens), "same tokenizer, same tokens"


def test_bad_tokenizer_path_is_named(corpus_dir: Path, tmp_path: Path) -> None:
    dm = make_dm(corpus_dir, tmp_path, tokenizer=str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="missing.json"):
        dm.prepare_data()


def test_too_short_split_names_block_size(tmp_path: Path) -> None:
    folder = tmp_path / "short"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"tiny doc {i}")
    dm = TextCorpusDataModule(source=str(folder), vocab_size=300, block_size=512, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    with pytest.raises(DataError, match="block_size"):
        dm.setup()


def test_failed_tokenization_leaves_no_cache(corpus_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("fmlab.data.text_corpus.write_tokens", crash)
    dm = make_dm(corpus_dir, tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    left = [p.name for p in (tmp_path / "cache").iterdir()]
    assert left == [f"{dm.cache_path.name}.lock"], "no half-written cache, no scratch folder; only its lock file"
