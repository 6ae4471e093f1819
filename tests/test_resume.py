"""Exact resume: a run killed with SIGKILL mid-epoch, or stopped by SIGTERM (preemption), and resumed logs the losses
of an uninterrupted one; the data jumps to its position instead of replaying batches; a kill during a checkpoint
write leaves the previous checkpoint whole; resume=auto finds last.ckpt."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from fmlab.callbacks import AtomicCheckpointIO
from fmlab.callbacks.preemption import PREEMPTED_EXIT_STATUS, slurm_job_id
from fmlab.data.resumable import resumable_loader
from fmlab.errors import UserError
from fmlab.resume import find_last_checkpoint, resolve_ckpt_path
from fmlab.runtime import build_trainer
from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]


class Recording(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.seen.append(i)
        return i


def test_loader_resumes_mid_epoch_by_jumping() -> None:
    full = resumable_loader(Recording(100), batch_size=8, seed=3)
    full.sampler.set_epoch(2)
    batches = [b.tolist() for b in full]
    assert sorted(sum(batches, [])) == sorted(set(sum(batches, [])))  # a permutation, no repeats

    dataset = Recording(100)
    resumed = resumable_loader(dataset, batch_size=8, seed=3)
    resumed.load_state_dict({"epoch": 2, "batches": 5})
    assert [b.tolist() for b in resumed] == batches[5:]
    assert sorted(dataset.seen) == sorted(sum(batches[5:], [])), "skipped samples must not be loaded"
    assert resumed.state_dict() == {"epoch": 2, "batches": len(batches)}

    # Saved on the last batch of an epoch: the next epoch starts from its beginning.
    after_epoch = resumable_loader(Recording(100), batch_size=8, seed=3)
    after_epoch.load_state_dict({"epoch": 2, "batches": len(batches)})
    full.sampler.set_epoch(3)
    assert [b.tolist() for b in after_epoch] == [b.tolist() for b in full]


def test_ranks_split_the_single_process_batches() -> None:
    """Two ranks with micro-batch 4 see, step for step, the samples one process sees with batch 8."""
    single = [set(b.tolist()) for b in resumable_loader(Recording(64), batch_size=8, seed=1)]

    class Rank:
        def __init__(self, rank: int) -> None:
            self.world_size, self.global_rank = 2, rank

    ranks = [[b.tolist() for b in resumable_loader(Recording(64), batch_size=4, seed=1, trainer=Rank(r))]
             for r in (0, 1)]
    assert [set(a) | set(b) for a, b in zip(*ranks, strict=True)] == single


WRITER = """
    import sys, time
    import torch
    import fmlab.callbacks.checkpoint as checkpoint
    from fmlab.callbacks import AtomicCheckpointIO

    class Stalling:
        # The checkpoint file, stalling after its first MiB is on disk, so the kill lands in the middle of a write.
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            n = self.f.write(data)
            self.written += n
            if self.written > 2**20:
                self.f.flush()
                print("mid-write", flush=True)
                time.sleep(60)
            return n

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, sys.argv[1])
    checkpoint.open = lambda *args, **kwargs: Stalling(open(*args, **kwargs))  # the next write stalls
    io.save_checkpoint({"step": 2, "w": torch.randn(2**21)}, sys.argv[1])  # 8 MiB
"""


def test_atomic_checkpoint_survives_a_kill_mid_write(tmp_path: Path) -> None:
    """SIGKILL while the next checkpoint is half on disk: last.ckpt is still the previous one, whole."""
    (tmp_path / "writer.py").write_text(textwrap.dedent(WRITER))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "writer.py"), str(path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "mid-write", proc.stderr.read()
        (partial,) = path.parent.glob("last.ckpt.tmp-*")
        assert partial.stat().st_size > 2**20, "the kill comes with part of the new checkpoint written"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["step"] == 1
    assert find_last_checkpoint(tmp_path / "run") == path, "resume=auto never picks the partial file"
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)  # the next save clears the dead writer's scratch file
    assert not partial.exists() and torch.load(path, weights_only=True)["step"] == 3


@pytest.mark.parametrize("preset", ["default", "cpu", "ddp_cpu"])
def test_shipped_trainers_write_checkpoints_atomically(preset: str, tmp_path: Path) -> None:
    cfg = compose_config([f"trainer={preset}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "run")
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_resume_auto_finds_the_latest_run(tmp_path: Path) -> None:
    logs = tmp_path / "outputs"
    old, new = (logs / "gpt_pretrain" / "2026-01-01" / t / "checkpoints" for t in ("10-00-00", "11-00-00"))
    sweep = logs / "gpt_pretrain" / "multirun" / "2026-01-02_00-00-00" / "0" / "checkpoints"
    for i, folder in enumerate((old, new, sweep)):
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
        os.utime(folder / "last.ckpt", (1000 + i, 1000 + i))
    current = logs / "gpt_pretrain" / "2026-01-03" / "12-00-00"

    def resolve(*overrides: str) -> str | None:
        return resolve_ckpt_path(compose_config([f"paths.log_dir={logs}", *overrides], current))

    assert resolve() is None
    assert resolve("resume=auto") == str(new / "last.ckpt")  # sweeps are not "the latest run"
    assert resolve("ckpt_path=last") == str(new / "last.ckpt")
    assert resolve("resume=auto", f"run_dir={old.parent}") == str(old / "last.ckpt")
    with pytest.raises(UserError, match="run_dir"):
        resolve("resume=auto", f"run_dir={tmp_path / 'nowhere'}")
    assert resolve("resume=auto", "paths.log_dir=/nonexistent") is None  # nothing to resume: start afresh
    assert resolve("resume=auto", "hydra.mode=MULTIRUN") is None  # a sweep job continues only its own folder
    (old.parent / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # Lightning's save on a SLURM requeue signal, newer
    assert resolve("resume=auto", f"run_dir={old.parent}") == str(old.parent / "hpc_ckpt_1.ckpt")


SIGNALLER = """
    import os, signal
    import lightning as L

    class SignalAtStep(L.Callback):
        # Sends `signal` to this process as the optimizer step after `step` begins.
        def __init__(self, step, signal="SIGKILL"):
            self.step, self.signal = step, signal

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.Signals[self.signal])
"""

# Wraps trainer.fit as fmlab/training.py is to (until it does, this script is what exits with the status):
#     try: trainer.fit(...)  except SIGTERMException: exit_preempted(trainer)
PREEMPTIBLE_TRAIN = """
    import runpy, sys
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from fmlab.callbacks.preemption import exit_preempted

    fit = L.Trainer.fit

    def preemptible_fit(trainer, *args, **kwargs):
        try:
            return fit(trainer, *args, **kwargs)
        except SIGTERMException:
            exit_preempted(trainer)

    L.Trainer.fit = preemptible_fit
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def losses(run_dir: Path, key: str) -> dict[int, float]:
    """Step -> value of one metric in a run's CSV log (a run resumed in its own folder appends: the later wins)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def assert_same_losses(run: dict[int, float], full: dict[int, float]) -> None:
    for step, loss in run.items():
        assert loss == pytest.approx(full[step], abs=1e-5), f"step {step}"


# An epoch of 25 steps (20 short documents, batch 8), checkpoints every 10 steps and after each validation (every
# 20); dropout, so equal losses need the RNG state restored too; the preemption callback as shipped.
LONG_EPOCH = [
    *(o for o in TINY_GPT if not o.startswith("callbacks=")), "callbacks=[model_checkpoint,preemption]",
    "data.batch_size=8", "trainer.max_steps=60", "trainer.val_check_interval=20",
    "callbacks.model_checkpoint.every_n_train_steps=10", "validate_before_fit=false", "model.dropout=0.1",
]
STEPS_PER_EPOCH = 25


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    """The overrides of the long-epoch run and the folder of its uninterrupted run (60 steps, into a third epoch)."""
    tmp = tmp_path_factory.mktemp("long_epoch")
    overrides = [*LONG_EPOCH, f"data.source={write_corpus(tmp / 'corpus', n_docs=20)}",
                 f"paths.cache_dir={tmp / 'cache'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs it is compared with (see `one_thread`)
    try:
        train(compose_config(overrides, tmp / "full"))
    finally:
        torch.set_num_threads(threads)
    return overrides, tmp / "full"


def run_train_py(tmp_path: Path, *args: str, script: str = "train.py") -> subprocess.CompletedProcess:
    (tmp_path / "signaller.py").write_text(textwrap.dedent(SIGNALLER))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_resume_after_sigkill_in_the_second_epoch_matches_uninterrupted_run(
    uninterrupted, tmp_path: Path, one_thread,
) -> None:
    """SIGKILL at step 42, 17 steps into the second epoch; resumed from the step-40 checkpoint (written after that
    step's validation), the run logs the losses of the uninterrupted one up to step 60, across the next epoch
    boundary. `configure_optimizers` reads `trainer.estimated_stepping_batches`, which sets the loaders up early
    (Lightning issue 20550 reports that this can drop a loader's saved position on resume): here the position
    holds, or the batches and so the losses would differ."""
    overrides, full = uninterrupted
    killed = tmp_path / "killed"
    proc = run_train_py(tmp_path, *overrides, f"hydra.run.dir={killed}",
                        "+callbacks.kill._target_=signaller.SignalAtStep", "+callbacks.kill.step=42")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    k = ckpt["global_step"]
    assert k == 40 and ckpt["epoch"] == 1, "the step-40 checkpoint, in the second epoch"
    (position,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position == {"epoch": 1, "batches": k - STEPS_PER_EPOCH}, "saved mid-epoch"

    train(compose_config([*overrides, "resume=auto", f"run_dir={killed}"], tmp_path / "resumed"))
    resumed = losses(tmp_path / "resumed", "train/loss")
    assert sorted(resumed) == list(range(k, 60))
    assert_same_losses(resumed, losses(full, "train/loss"))
    assert_same_losses(losses(tmp_path / "resumed", "val/loss"), losses(full, "val/loss"))


def test_sigterm_saves_exits_for_requeue_and_resume_auto_continues(uninterrupted, tmp_path: Path, one_thread) -> None:
    """SIGTERM during step 34: last.ckpt is saved at step 34, the process exits with the requeue status and one line;
    the same command with resume=auto (a requeued job, same folder) runs to step 60, and the run's whole log equals
    the uninterrupted run's."""
    overrides, full = uninterrupted
    (tmp_path / "preemptible_train.py").write_text(textwrap.dedent(PREEMPTIBLE_TRAIN))
    job = tmp_path / "job"
    proc = run_train_py(tmp_path, "train.py", *overrides, f"hydra.run.dir={job}",
                        "+callbacks.term._target_=signaller.SignalAtStep", "+callbacks.term.step=33",
                        "+callbacks.term.signal=SIGTERM", script=str(tmp_path / "preemptible_train.py"))
    assert proc.returncode == PREEMPTED_EXIT_STATUS == 75, proc.stderr[-3000:]
    last = job / "checkpoints" / "last.ckpt"
    assert f"Preempted at step 34: saved {last}; rerun with resume=auto to continue" in proc.stdout.splitlines()
    assert torch.load(last, weights_only=True)["global_step"] == 34
    before = {key: losses(job, key) for key in ("train/loss", "val/loss")}
    assert max(before["train/loss"]) == 33, "stopped right after the step it saved, its loss logged"

    train(compose_config([*overrides, "resume=auto"], job))
    assert torch.load(last, weights_only=True)["global_step"] == 60
    # The requeued job appends to its folder's metrics.csv (fmlab.loggers.CSVLogger): the one file holds the run's
    # whole log, before and after the preemption, and it equals the uninterrupted run's.
    for key in ("train/loss", "val/loss"):
        after = losses(job, key)
        assert before[key].items() <= after.items(), "the steps before the preemption are kept"
        assert sorted(after) == sorted(losses(full, key))
        assert_same_losses(after, losses(full, key))


def test_sigusr1_saves_at_the_step_boundary_and_requeues_the_slurm_job(
    make_config, corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    """SIGUSR1 (SLURM's warning before the time limit) in-process: last.ckpt at the step, `scontrol requeue <job>`,
    `Preempted` with the requeue status; the signal handlers are Lightning's and the caller's again afterwards."""
    (tmp_path / "signaller.py").write_text(textwrap.dedent(SIGNALLER))
    monkeypatch.syspath_prepend(str(tmp_path))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" > "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(tmp_path / "scontrol.log"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    overrides = [o for o in TINY_GPT if not o.startswith("callbacks=")]
    cfg = make_config([*overrides, "callbacks=[model_checkpoint,preemption]", f"data.source={corpus_dir}",
                       "validate_before_fit=false", "+callbacks.usr1._target_=signaller.SignalAtStep",
                       "+callbacks.usr1.step=3", "+callbacks.usr1.signal=SIGUSR1"])
    with pytest.raises(SystemExit) as stopped:  # train() turns `Preempted` into its line and the requeue status
        train(cfg)
    assert stopped.value.code == 75
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert f"Preempted at step 4: saved {last}" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert slurm_job_id({"SLURM_JOB_ID": "7", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}) == "5_2"
