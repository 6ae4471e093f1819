"""The throughput benchmark's competitors build from the shipped configs and time their steps (tiny shapes)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.vocab_size=300"]


@pytest.fixture
def bench(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WORKDIR", tmp_path / "work")
    return module


@pytest.mark.parametrize("name, runners", [
    ("tiny", ["raw loop", "fmlab (bare)", "fmlab"]),
    ("bert", ["raw loop", "fmlab", "HF Trainer"]),
])
def test_every_competitor_trains_the_workload(bench, name: str, runners: list[str], tmp_path: Path, one_thread) -> None:
    workload = bench.WORKLOADS[name]
    overrides = [*workload.overrides, *TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg, dm, competitors = bench.build(dataclasses.replace(workload, overrides=overrides), "32", 4)
    assert [c.name for c in competitors] == runners
    for competitor in competitors:
        times = competitor.run(3)
        assert len(times) == 3 and min(times) > 0, competitor.name
