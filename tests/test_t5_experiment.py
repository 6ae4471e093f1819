"""The T5 experiment driver (experiments/t5/run.py): its classic baselines and a results file two drivers share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parents[1] / "experiments" / "t5" / "run.py"


@pytest.fixture
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("t5_experiment", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results.json")
    return module


def test_the_word_for_word_baseline_learns_a_dictionary_from_the_pairs(driver) -> None:
    pairs = [{"source": "the dog runs", "target": "el perro corre"},
             {"source": "the cat runs", "target": "el gato corre"},
             {"source": "a dog sleeps", "target": "un perro duerme"},
             {"source": "a cat sleeps", "target": "un gato duerme"},
             {"source": "the bird sleeps", "target": "el pájaro duerme"}]
    translate = driver.word_for_word(pairs)
    assert translate("the dog runs") == "el perro corre"
    assert translate("a bird sleeps") == "un pájaro duerme"
    assert translate("the fish runs .") == "el fish corre ."   # unseen words are copied


def test_the_lead_baseline_scores_the_articles_first_words(driver, tmp_path: Path) -> None:
    for task in ("translation", "summarisation"):
        for split in ("train", "test"):
            pairs = [{"source": "Oil prices rise again in Asia today. More text follows.", "target": "Oil prices rise"}]
            driver.write_jsonl(tmp_path / task / f"{split}.jsonl", pairs)
    scores = driver.baselines(tmp_path)
    assert scores["summarisation"]["lead (3 words)"]["test/rouge1"] == pytest.approx(100.0)
    assert scores["translation"]["copy source"]["test/rouge1"] < 100.0
