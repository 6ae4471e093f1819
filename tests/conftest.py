"""Shared fixtures: compose the real configs with tiny overrides, and generate small corpora."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from fmlab.config import CONF_DIR  # noqa: F401  (re-exported for the tests)
from fmlab.config import compose_train_config as compose_config

# A tiny GPT and a short CPU run: seconds per test.
TINY_GPT = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "data.vocab_size=300", "data.batch_size=8",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32",
    "trainer.max_steps=30", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "logger=csv", "callbacks=[model_checkpoint]",
]


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """make_config(overrides, run="run") -> a config whose run folder and cache live in tmp_path."""

    def make(overrides: list[str], run: str = "run") -> DictConfig:
        return compose_config([f"paths.cache_dir={tmp_path / 'cache'}", *overrides], tmp_path / run)

    return make


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of a run's CSV log."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def values(rows: list[dict], key: str) -> list[float]:
    """The logged values of one metric, in order."""
    return [float(r[key]) for r in rows if r.get(key)]


WORDS = (
    "the a market bank film music game team player vote election minister phone software network price "
    "growth shares rose fell said year new first won lost record album band match season club goal law"
).split()


def write_corpus(folder: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """A folder of small .txt documents with some repeated structure, so a model can learn something."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        topic = WORDS[(i % 5) * 6 : (i % 5) * 6 + 6]
        sentences = [" ".join(rng.choice(topic) for _ in range(8)) + "." for _ in range(12)]
        (folder / f"doc{i:03d}.txt").write_text(f"Story {i}\n\n" + " ".join(sentences))
    return folder


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")
