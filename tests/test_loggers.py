"""W&B runs offline by default (no login prompt), receives the resolved config, and a resumed run continues the same
W&B run while sweep jobs each get their own."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fmlab.resolve import read_checkpoint
from fmlab.resume import logger_overrides, resolve_ckpt_path, resume_logger_runs
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
    record = offline_record(runs[0])
    assert b"n_embd" in record and str(corpus_dir).encode() in record  # the resolved config, not interpolations
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()


def offline_record(run: Path, wait_s: float = 60.0) -> bytes:
    """An offline run's log (what `wandb sync` uploads). wandb's service process writes it; under load its records
    may land a moment after `wandb.finish()` returns, so wait for them (the file starts with a 7-byte header)."""
    deadline = time.monotonic() + wait_s
    while True:
        record = next(run.glob("run-*.wandb")).read_bytes()
        if b"n_embd" in record or time.monotonic() > deadline:
            return record
        time.sleep(0.5)


def test_wandb_mode_online_switches_offline_off(make_config, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    assert make_config([]).logger.wandb.offline is False


def offline_run_ids(run_dir: Path) -> list[str]:
    """The W&B run ids of a run folder's offline runs (`wandb/offline-run-<time>-<id>`)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))]


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Offline W&B, quiet; the overrides of a 4-step tiny run that logs to csv and W&B and saves the run id."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny = [o for o in TINY_GPT if not o.startswith(("logger=", "callbacks="))]
    return [*tiny, "logger=[csv,wandb]", "callbacks=[model_checkpoint,wandb_resume]", "trainer.max_steps=4",
            "trainer.val_check_interval=4", "validate_before_fit=false"]


def test_resumed_run_continues_the_same_wandb_run(make_config, corpus_dir: Path, tmp_path: Path, wandb_offline):
    """The checkpoint carries the W&B run id; merged into the logger node (`resume_logger_runs`, as training.py
    does), the resumed run logs to an offline run with that id, and its own checkpoints carry it on."""
    overrides = [*wandb_offline, f"data.source={corpus_dir}"]
    train(make_config(overrides, run="first"))
    (run_id,) = offline_run_ids(tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["logger_ids"] == {"wandb": run_id}
    assert logger_overrides(str(last)) == {"wandb": {"id": run_id, "resume": "allow"}}

    cfg = make_config([*overrides, "resume=auto", f"run_dir={tmp_path / 'first'}", "trainer.max_steps=6"],
                      run="resumed")
    assert resume_logger_runs(cfg, resolve_ckpt_path(cfg)) is cfg.logger
    assert cfg.logger.wandb.id == run_id and cfg.logger.wandb.resume == "allow"
    assert "id" not in cfg.logger.csv
    train(cfg)
    assert offline_run_ids(tmp_path / "resumed") == [run_id]
    (offline,) = (tmp_path / "resumed" / "wandb").glob("offline-run-*")
    assert (offline / f"run-{run_id}.wandb").is_file(), "what `wandb sync` uploads into the same run"
    resumed = read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 6 and resumed["logger_ids"] == {"wandb": run_id}


def test_sweep_jobs_get_their_own_wandb_runs(make_config, corpus_dir: Path, tmp_path: Path, wandb_offline):
    """Sweep jobs that start from one shared checkpoint each get a new W&B run; a requeued job (its own folder's
    checkpoint) continues its own; an id set in the config wins."""
    overrides = [*wandb_offline, f"data.source={corpus_dir}"]
    train(make_config(overrides, run="first"))
    (first_id,) = offline_run_ids(tmp_path / "first")
    shared = tmp_path / "first" / "checkpoints" / "last.ckpt"

    job_ids = []
    for job in ("sweep/0", "sweep/1"):
        cfg = make_config([*overrides, "hydra.mode=MULTIRUN", f"ckpt_path={shared}", "trainer.max_steps=5"], run=job)
        assert "id" not in resume_logger_runs(cfg, resolve_ckpt_path(cfg)).wandb
        train(cfg)
        assert read_checkpoint(tmp_path / job / "checkpoints" / "last.ckpt")["global_step"] == 5, "the job ran"
        job_ids += offline_run_ids(tmp_path / job)
    assert len(job_ids) == len({first_id, *job_ids}) - 1 == 2, "one W&B run per job, none the shared checkpoint's"

    requeued = make_config([*overrides, "hydra.mode=MULTIRUN", "resume=auto"], run="sweep/1")
    assert resume_logger_runs(requeued, resolve_ckpt_path(requeued)).wandb.id == job_ids[1]
    chosen = make_config([*overrides, "resume=auto", f"run_dir={tmp_path / 'first'}", "+logger.wandb.id=fork"])
    assert resume_logger_runs(chosen, resolve_ckpt_path(chosen)).wandb.id == "fork"
