"""The throughput benchmark's competitors build from the shipped configs and time their steps (tiny shapes)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.vocab_size=300"]
SLEEP = 0.02  # seconds added to every forward pass of every competitor's model, so a step's time has a floor


@pytest.fixture
def bench(tmp_path: Path, monkeypatch):
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "throughput", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WORKDIR", tmp_path / "work")
    monkeypatch.setattr(module, "OUT", tmp_path / "out")
    return module


@pytest.fixture
def slow_forward():
    """Sleep in the token embedding (the one larger than block_size=32) of every model: once per step."""

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding) and module.num_embeddings > 32:
            time.sleep(SLEEP)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield
    handle.remove()


@pytest.mark.parametrize("name, spec, runners", [
    ("tiny", None, ["raw loop fp32", "fmlab (bare) fp32", "fmlab fp32"]),
    ("bert", "reference:32,fmlab:32,hf:32", ["reference fp32", "fmlab fp32", "HF Trainer fp32"]),
])
def test_every_competitor_trains_the_workload(bench, name: str, spec: str | None, runners: list[str], tmp_path: Path,
                                              monkeypatch, one_thread, slow_forward) -> None:
    """The benchmark's own main() on one round: every runner's step times span its forward pass and fit in the
    wall time of its chunk, and the report has a row for every runner, computed from those times."""
    workload = bench.WORKLOADS[name]
    overrides = [*workload.overrides, *TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    monkeypatch.setitem(bench.WORKLOADS, name, dataclasses.replace(workload, overrides=overrides))
    chunks: dict[str, list[tuple[int, float, list[float]]]] = {}  # runner -> (steps asked, wall s, step times)
    build = bench.build

    def build_and_watch(*args):
        cfg, dm, competitors, losses = build(*args)
        for label, competitor in competitors.items():
            def run(steps: int, label=label, run=competitor.run) -> list[float]:
                start = time.perf_counter()
                times = run(steps)
                chunks.setdefault(label, []).append((steps, time.perf_counter() - start, list(times)))
                return times
            competitor.run = run
        return cfg, dm, competitors, losses

    monkeypatch.setattr(bench, "build", build_and_watch)
    argv = ["--workload", name, "--rounds", "1", "--steps", "3", "--drop", "1", "--batch-size", "4", "--threads", "1",
            "--logger", "csv", *(["--runners", spec] if spec else [])]
    monkeypatch.setattr(sys, "argv", ["throughput.py", *argv])
    bench.main()

    assert list(chunks) == runners
    for runner, runs in chunks.items():
        assert [steps for steps, _, _ in runs] == [2, 3], runner  # the warm-up chunk (drop + 1), then one round
        for steps, wall, times in runs:
            assert len(times) == steps and min(times) >= SLEEP and sum(times) <= wall, (runner, times, wall)
    result = json.loads((tmp_path / "out" / f"{name}-t1.json").read_text())
    rows = result["results"]
    assert list(rows) == runners and result["batch_size"] == 4
    for runner, row in rows.items():
        timed = [t * 1000 for t in chunks[runner][1][2][1:]]  # the round's chunk less its first (dropped) step
        assert row["steps"] == 2 and row["min_ms"] == pytest.approx(min(timed)), runner
        assert row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= max(timed) + 1e-6, runner
        assert row["per_s"] == pytest.approx(4 * 32 / (row["median_ms"] / 1000)), runner
        base = runners[0]
        key = "vs_" + base.replace(" ", "_")
        assert row[key] == pytest.approx(rows[base]["median_ms"] / row["median_ms"]), runner
        assert row["first_step_s"] >= SLEEP, runner
        achieved = result["flops_per_step"] / (row["median_ms"] / 1000)  # its share of the CPU's best matmul
        assert row["tflops"] == pytest.approx(achieved / 1e12), runner
        assert row["of_matmul_peak"] == pytest.approx(achieved / (result["cpu_matmul_peak_gflops"]["fp32"] * 1e9))
    assert rows[runners[0]]["vs_" + runners[0].replace(" ", "_")] == 1.0
    if name == "bert":  # the three started from the same weights: one batch, the same loss
        losses = result["initial_losses"]
        assert losses["reference"] == pytest.approx(losses["fmlab"], rel=1e-4)
        assert losses["HF"] == pytest.approx(losses["fmlab"], rel=1e-4)
        assert "fmlab fp32 / HF Trainer fp32" in result["ratios"]
    table = (tmp_path / "out" / f"{name}-t1.md").read_text()
    assert all(f"| {runner} |" in table for runner in runners) and "% of matmul peak" in table
    if name == "tiny":  # an earlier file rescored: the model's own count, the timings untouched
        monkeypatch.setattr(sys, "argv", ["throughput.py", "--rescore", str(tmp_path / "out" / "tiny-t1.json")])
        bench.main()
        again = json.loads((tmp_path / "out" / "tiny-t1.json").read_text())
        assert again["flops_per_step"] == pytest.approx(result["flops_per_step"])
        assert [r["median_ms"] for r in again["results"].values()] == [r["median_ms"] for r in rows.values()]
        assert "--rescore" in (tmp_path / "out" / "tiny-t1.md").read_text()
