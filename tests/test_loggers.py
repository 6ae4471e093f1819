"""W&B runs offline by default (no login prompt) and receives the resolved config."""

from __future__ import annotations

from pathlib import Path

from fmlab.training import train
from tests.conftest import TINY_GPT


def test_wandb_runs_offline_with_the_resolved_config(make_config, corpus_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    overrides = [o for o in TINY_GPT if not o.startswith("logger=")]
    cfg = make_config([*overrides, "logger=[csv,wandb]", f"data.source={corpus_dir}", "trainer.max_steps=3",
                       "trainer.val_check_interval=3", "tags=[unit]"])
    assert cfg.logger.wandb.offline is True
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline W&B run in the run folder"
    record = next(runs[0].glob("run-*.wandb")).read_bytes()  # the offline run's log, synced by `wandb sync`
    assert b"n_embd" in record and str(corpus_dir).encode() in record  # the resolved config, not interpolations
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()


def test_wandb_mode_online_switches_offline_off(make_config, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    assert make_config([]).logger.wandb.offline is False
