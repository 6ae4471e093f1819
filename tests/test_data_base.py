"""The data-module base (cache once, prepare / setup once, `describe()`), the reader registry and the cache lock."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer

from fmlab.data import image_sources, sources
from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.images import ImageDataModule
from fmlab.data.labeled_text import LabeledTextDataModule
from fmlab.data.sources import (
    READERS,
    DataError,
    Preset,
    find_preset,
    fingerprint,
    read_split_table,
    read_texts,
    register_preset,
)
from fmlab.data.text_corpus import TextCorpusDataModule
from tests.conftest import write_corpus
from tests.image_data import write_fashion_like
from tests.labeled_data import TOPICS, write_labeled_csv

# ---- the base, alone ----------------------------------------------------------------------------------------


class Squares(CachedDataModule):
    """The smallest data module: n squares, cached as one .npy file."""

    cache_prefix, cache_title = "squares", "squares"

    def __init__(self, n: int, cache_dir: Path, fail: bool = False) -> None:
        super().__init__(cache_dir=str(cache_dir), batch_size=2)
        self.n, self.fail, self.builds, self.loads = n, fail, 0, 0
        self.values: torch.Tensor | None = None

    def cache_spec(self) -> dict:
        return {"n": self.n}

    def build_cache(self, folder: Path) -> dict:
        self.builds += 1
        np.save(folder / "squares.npy", np.arange(self.n) ** 2)
        if self.fail:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way through a build
        return {"n": self.n}

    def load(self, folder: Path, meta: dict) -> None:
        self.loads += 1
        self.values = torch.from_numpy(np.load(folder / "squares.npy"))
        assert meta == {"n": self.n}

    def describe(self) -> DataInfo:
        self.setup()
        return DataInfo(model={"n": self.n}, state={"total": int(self.values.sum())})

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.train_loader(self.values, drop_last=False)


def test_the_base_builds_once_reuses_and_sets_up_once(tmp_path: Path, caplog) -> None:
    first = Squares(5, tmp_path / "cache")
    first.prepare_data()
    assert first.builds == 1 and first.cache_path.name.startswith("squares-")
    assert json.loads((first.cache_path / "meta.json").read_text()) == {"n": 5}

    second = Squares(5, tmp_path / "cache")
    with caplog.at_level(logging.INFO):
        second.prepare_data()
    assert second.builds == 0 and f"Reusing squares cache {first.cache_path}" in caplog.text
    second.setup()
    second.setup()
    assert second.loads == 1 and second.values.tolist() == [0, 1, 4, 9, 16]
    assert sorted(torch.cat(list(second.train_dataloader())).tolist()) == [0, 1, 4, 9, 16]

    fresh = Squares(5, tmp_path / "other")
    fresh.setup()  # without prepare_data: setup prepares the missing cache itself
    assert (fresh.builds, fresh.loads) == (1, 1)
    assert fresh.describe() == DataInfo(model={"n": 5}, state={"total": 30})

    assert Squares(6, tmp_path / "cache").cache_path.parent == first.cache_path.parent
    assert Squares(6, tmp_path / "cache").cache_path != first.cache_path
    bumped = Squares(5, tmp_path / "cache")
    bumped.cache_version = 2
    assert bumped.cache_path != first.cache_path, "a new cache format never reads an old cache"


def test_a_failed_build_publishes_nothing_and_the_next_one_succeeds(tmp_path: Path) -> None:
    broken = Squares(4, tmp_path, fail=True)
    with pytest.raises(KeyboardInterrupt):
        broken.prepare_data()
    assert [p.name for p in tmp_path.iterdir()] == [f"{broken.cache_path.name}.lock"]
    again = Squares(4, tmp_path)
    again.setup()
    assert again.builds == 1 and again.values.tolist() == [0, 1, 4, 9]


# ---- describe(): what each data module tells the run --------------------------------------------------------


def test_text_corpus_describes_vocab_and_block_size(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    dm = TextCorpusDataModule(source=str(corpus), vocab_size=300, block_size=16, cache_dir=str(tmp_path / "c"))
    info = dm.describe()
    assert info.model == {"vocab_size": dm.tokenizer.get_vocab_size()} and 261 < info.model["vocab_size"] <= 300
    assert info.task == {} and info.max_length == 16
    assert info.tokenizer is dm.tokenizer and set(info.state) == {"tokenizer"}
    assert Tokenizer.from_str(info.state["tokenizer"]).get_vocab() == dm.tokenizer.get_vocab()


def test_labeled_text_describes_labels_and_max_length(tmp_path: Path) -> None:
    source = write_labeled_csv(tmp_path / "data.csv", per_class=12)
    dm = LabeledTextDataModule(source=str(source), vocab_size=300, max_length=24, cache_dir=str(tmp_path / "c"))
    info = dm.describe()
    assert info.task == {"num_labels": 5} and info.max_length == 24
    assert info.model == {"vocab_size": dm.tokenizer.get_vocab_size()}
    assert info.state["labels"] == sorted(TOPICS) and info.state["regression"] is False
    assert set(info.state) == {"tokenizer", "labels", "regression"} and info.tokenizer is dm.tokenizer


def test_images_describe_channels_size_and_normalisation(tmp_path: Path) -> None:
    root = str(write_fashion_like(tmp_path / "fm", n_train=40, n_test=10))
    dm = ImageDataModule(root=root, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    info = dm.describe()
    assert info.model == {"in_chans": 1, "img_size": 28} and info.task == {}
    assert info.tokenizer is None and info.max_length is None
    assert info.state["image_shape"] == [1, 28, 28] and info.state["normalization"] == {"mean": dm.mean, "std": dm.std}
    assert len(info.state["labels"]) == 10
    labeled = ImageDataModule(root=root, labeled=True, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    assert labeled.describe().task == {"num_labels": 10}
    assert labeled.cache_path == dm.cache_path, "labels do not change the decoded images"


# ---- readers and presets --------------------------------------------------------------------------------------

ROWS = [{"text": f"document {i}", "label": str(i % 2)} for i in range(4)]
WRITERS = {
    ".txt": lambda path: path.write_text(ROWS[0]["text"]),
    ".jsonl": lambda path: path.write_text("\n".join(json.dumps(r) for r in ROWS)),
    ".csv": lambda path: path.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in ROWS)),
    ".parquet": lambda path: pq.write_table(pa.Table.from_pylist(ROWS), path),
}


def test_every_registered_suffix_has_a_test() -> None:
    assert set(WRITERS) == set(READERS)


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_every_suffix_reads_into_a_split_table(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    WRITERS[suffix](path)
    columns = ["text"] if suffix == ".txt" else ["text", "label"]
    expected = [{"text": ROWS[0]["text"]}] if suffix == ".txt" else ROWS
    assert read_split_table(str(path), columns) == {"all": expected}


def test_named_files_give_their_splits(tmp_path: Path) -> None:
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        WRITERS[".jsonl"](tmp_path / name)
    table = read_split_table(str(tmp_path), ["text"])
    assert sorted(table) == ["test", "train", "val"] and table["val"] == [{"text": r["text"]} for r in ROWS]
    assert len(read_texts(str(tmp_path))) == 4, "a corpus takes every split, deduplicated"


def test_an_unknown_suffix_names_the_file_and_the_readable_ones(tmp_path: Path) -> None:
    path = tmp_path / "data.xml"
    path.write_text("<doc/>")
    with pytest.raises(DataError) as err:
        read_split_table(str(path), ["text"])
    assert str(path) in str(err.value) and "'.xml'" in str(err.value)
    assert all(suffix in str(err.value) for suffix in READERS)
    WRITERS[".csv"](tmp_path / "data.csv")
    assert read_split_table(str(tmp_path), ["text"])["all"] == [{"text": r["text"]} for r in ROWS], (
        "a folder is searched for readable files only"
    )


def test_a_registered_preset_is_read_and_fingerprinted_by_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "PRESETS", dict(sources.PRESETS))
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for f in files:
        f.write_bytes(b"x")
    table = {"train": [{"text": "one", "id": 1}], "test": [{"text": "two", "id": 2}]}
    register_preset(Preset("toy", "text", read=lambda: table, files=lambda **_: files))
    assert find_preset("toy", "text").name == "toy"
    assert read_split_table("toy", ["text"]) == {"train": [{"text": "one"}], "test": [{"text": "two"}]}
    assert read_texts("toy") == ["one", "two"]
    before = fingerprint("toy")
    assert [entry[0] for entry in before] == [str(f.resolve()) for f in files]
    files[0].write_bytes(b"longer")
    assert fingerprint("toy") != before
    with pytest.raises(DataError, match="no column 'label'"):
        read_split_table("toy", ["text", "label"])
    with pytest.raises(DataError, match=r"data.source=toy is a preset of text, not images"):
        find_preset("toy", "images")


def test_the_shipped_presets_are_registered() -> None:
    assert find_preset("bbc_news", "text").kind == "text"
    assert find_preset("fashion_mnist", "images").read is image_sources.read_fashion_mnist
    assert find_preset(str(Path("some/folder")), "text") is None
    with pytest.raises(DataError, match="bbc_news"):  # a text module given an image preset lists the text ones
        read_split_table("fashion_mnist", ["text"])


def test_a_saved_hf_dataset_is_one_reader_for_text_and_images(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    assert image_sources.is_hf_dataset is sources.is_hf_dataset
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "hf"))
    assert read_split_table(str(tmp_path / "hf"), ["text"]) == {"all": [{"text": r["text"]} for r in ROWS]}
    stored = {str(p.resolve()) for p in (tmp_path / "hf").rglob("*") if p.is_file()}
    assert {entry[0] for entry in fingerprint(str(tmp_path / "hf"))} == stored


def test_folder_fingerprint_follows_every_file(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_docs=3)
    before = fingerprint(str(corpus))
    assert len(before) == 3 and fingerprint(str(corpus)) == before
    (corpus / "doc001.txt").write_text("edited")
    assert fingerprint(str(corpus)) != before
    with pytest.raises(DataError, match="no such file or folder"):
        fingerprint(str(tmp_path / "nope"))


# ---- two processes, one fresh cache ---------------------------------------------------------------------------


def prepare_in_child(corpus: str, cache: str, marker: str, barrier) -> None:
    """Prepare and load the corpus cache, counting (in `marker`) how often this process tokenized it."""
    build = TextCorpusDataModule.build_cache

    def counted(self: TextCorpusDataModule, folder: Path) -> dict:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # still building when the other process arrives
        return build(self, folder)

    TextCorpusDataModule.build_cache = counted
    dm = TextCorpusDataModule(source=corpus, vocab_size=300, block_size=16, cache_dir=cache)
    barrier.wait(timeout=120)  # both start from a cache that does not exist yet
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) > 0


def test_two_processes_on_a_fresh_cache_tokenize_once(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    cache, marker = tmp_path / "cache", tmp_path / "builds.txt"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=prepare_in_child, args=(str(corpus), str(cache), str(marker), barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(marker.read_text().split()) == 1, "one process tokenized, the other waited and reused"
    dm = TextCorpusDataModule(source=str(corpus), vocab_size=300, block_size=16, cache_dir=str(cache))
    assert sorted(p.name for p in cache.iterdir()) == [dm.cache_path.name, f"{dm.cache_path.name}.lock"]
    dm.setup()
    meta = json.loads((dm.cache_path / "meta.json").read_text())
    assert len(dm.train_set.tokens) == meta["tokens"]["train"] and len(dm.val_set.tokens) == meta["tokens"]["val"]
    assert Tokenizer.from_file(str(dm.cache_path / "tokenizer.json")).get_vocab_size() == meta["vocab_size"]
