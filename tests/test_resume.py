"""Exact resume: a run killed with SIGKILL and resumed logs the losses of an uninterrupted one; the data jumps to
its position instead of replaying batches; checkpoints are written atomically; resume=auto finds last.ckpt."""

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
from fmlab.data.resumable import resumable_loader
from fmlab.resume import resolve_ckpt_path
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


def test_atomic_checkpoint_survives_a_failed_write(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "x": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert list(path.parent.iterdir()) == [path], "no temporary file left behind"


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
    with pytest.raises(FileNotFoundError, match="run_dir"):
        resolve("resume=auto", f"run_dir={tmp_path / 'nowhere'}")
    assert resolve("resume=auto", "paths.log_dir=/nonexistent") is None  # nothing to resume: start afresh
    assert resolve("resume=auto", "hydra.mode=MULTIRUN") is None  # a sweep job continues only its own folder
    (old.parent / "hpc_ckpt_1.ckpt").write_bytes(b"x")  # Lightning's save on a SLURM requeue signal, newer
    assert resolve("resume=auto", f"run_dir={old.parent}") == str(old.parent / "hpc_ckpt_1.ckpt")


KILLER = """
    import os, signal
    import lightning as L

    class KillAtStep(L.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)
"""


def losses(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    """Checkpoints every 6 steps and after each validation (every 7), SIGKILL at step 8, resume to step 14: the
    steps after the checkpoint (they cross an epoch boundary) log the losses of the uninterrupted run."""
    corpus = write_corpus(tmp_path / "corpus", n_docs=30)
    overrides = [
        *TINY_GPT, f"data.source={corpus}", f"paths.cache_dir={tmp_path / 'cache'}", "data.batch_size=32",
        "trainer.max_steps=14", "trainer.val_check_interval=7", "callbacks.model_checkpoint.every_n_train_steps=6",
        "validate_before_fit=false", "model.dropout=0.1",  # dropout: equal losses need the RNG state restored
    ]
    train(compose_config(overrides, tmp_path / "full"))

    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, f"hydra.run.dir={killed}",
         "+callbacks.kill._target_=killer.KillAtStep", "+callbacks.kill.step=8"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    k = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < k < 8, "the last checkpoint before the kill"

    train(compose_config([*overrides, "resume=auto", f"run_dir={killed}"], tmp_path / "resumed"))
    full, resumed = losses(tmp_path / "full", "train/loss"), losses(tmp_path / "resumed", "train/loss")
    assert sorted(resumed) == [s for s in sorted(full) if s >= k]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-5), f"step {step}"
    assert losses(tmp_path / "resumed", "val/loss") == pytest.approx(
        {s: v for s, v in losses(tmp_path / "full", "val/loss").items() if s >= k}, abs=1e-5)
