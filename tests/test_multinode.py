"""Two nodes on localhost, one CPU process each over gloo, started as a cluster starts them: by two torchrun agents
(`--nnodes=2 --node-rank=r`), and by a faked 2-task SLURM allocation (the `SLURM_*` variables srun sets). Lightning
must take the launcher's ranks (TorchElasticEnvironment / SLURMEnvironment), both nodes write one run folder, and the
training loss of every step equals a one-process run with the same global batch."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, write_corpus
from tests.test_ddp import STEP_TOLERANCE, StepLosses, step_losses

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 6
# Variables a launcher sets; each test starts from an environment with none of them.
LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_")
LAUNCHER_KEYS = {"RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT"}


class RankReport(StepLosses):
    """StepLosses, plus <folder>/env<r>.json: the cluster environment Lightning chose and the ranks it gave."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = getattr(trainer.strategy, "cluster_environment", None)
        self.folder.mkdir(parents=True, exist_ok=True)
        report = {"environment": type(env).__name__, "global_rank": trainer.global_rank,
                  "node_rank": trainer.node_rank, "local_rank": trainer.local_rank, "world_size": trainer.world_size,
                  "run_dir": trainer.default_root_dir, "accumulate": trainer.accumulate_grad_batches}
        (self.folder / f"env{trainer.global_rank}.json").write_text(json.dumps(report))


def report(folder: Path) -> list[str]:
    return [f"+callbacks.rank_report._target_={__name__}.RankReport", f"+callbacks.rank_report.folder={folder}"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_KEYS and not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A port nothing listens on, in [low, high)."""
    for _ in range(100):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def run_nodes(commands: list[list[str]], envs: list[dict[str, str]]) -> None:
    """Start one process per node at once, wait for all; a failure shows every node's output."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in zip(commands, envs, strict=True)]
    outputs = []
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    codes = [proc.returncode for proc in procs]
    assert codes == [0] * len(procs), "\n\n".join(f"node {i} (exit {c}):\n{out[-3000:]}"
                                                  for i, (c, out) in enumerate(zip(codes, outputs, strict=True)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str], dict[int, float]]:
    """The corpus, the overrides every run shares, and the per-step losses of one process with batch 8."""
    root = tmp_path_factory.mktemp("multinode")
    corpus = write_corpus(root / "corpus", n_docs=30)
    overrides = [o for o in TINY_GPT if not o.startswith(("trainer.devices", "data.batch_size"))] + [
        f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}", "validate_before_fit=false", "data.global_batch_size=8",
    ]
    train(compose_config([*overrides, "data.batch_size=8", *report(root / "single")], root / "single_run"))
    # Two nodes x 1 process x micro-batch 4 = the global batch 8 of the single run, no accumulation.
    multi = [*overrides, "trainer=ddp_cpu", "trainer.devices=1", "trainer.num_nodes=2", "data.batch_size=4"]
    return root, multi, step_losses(root / "single", 0)


def check_nodes(run_dir: Path, losses: Path, single: dict[int, float], environment: str) -> None:
    """One run folder for both nodes, the launcher's ranks, and the one-process losses."""
    reports = [json.loads((losses / f"env{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["environment"], r["global_rank"], r["node_rank"], r["local_rank"], r["world_size"], r["accumulate"])
            for r in reports] == [(environment, 0, 0, 0, 2, 1), (environment, 1, 1, 0, 2, 1)]
    assert {r["run_dir"] for r in reports} == {str(run_dir)}, "both nodes write one run folder"
    assert sorted(p.name for p in run_dir.parent.iterdir() if p.is_dir() and p.name == run_dir.name) == [run_dir.name]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "csv" / "metrics.csv").is_file()
    assert (run_dir / "train.log").is_file() and (run_dir / "train_rank1.log").is_file(), "one log per node"
    rank0, rank1 = step_losses(losses, 0), step_losses(losses, 1)
    assert list(single) == list(rank0) == list(rank1) == list(range(1, STEPS + 1)), "both nodes take every step"
    assert rank0[1] != rank1[1], "each node trains on its own half of the global batch"
    for step, loss in single.items():
        assert (rank0[step] + rank1[step]) / 2 == pytest.approx(loss, abs=STEP_TOLERANCE), f"step {step}"
    assert single[STEPS] < single[1], "the runs compared are training"


def test_torchrun_two_nodes_match_one_process(setup) -> None:
    """`torchrun --nnodes=2 --nproc-per-node=1 --node-rank=<r>`, one agent per node, static rendezvous on the
    master address; the README's multi-node command with 1 CPU process per node."""
    root, overrides, single = setup
    run_dir, port = root / "torchrun" / "two-nodes", free_port()
    commands = [[str(TORCHRUN), "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                 "--master-addr=127.0.0.1", f"--master-port={port}", "train.py", *overrides,
                 *report(root / "torchrun_losses"), f"hydra.run.dir={run_dir}"] for rank in (0, 1)]
    run_nodes(commands, [clean_env(), clean_env()])
    check_nodes(run_dir, root / "torchrun_losses", single, "TorchElasticEnvironment")


def slurm_task_env(rank: int, job_id: str) -> dict[str, str]:
    """What srun sets for task `rank` of `sbatch --nodes=2 --ntasks-per-node=1`: Lightning reads world size, ranks
    and node from these, the master address from the first host of SLURM_NODELIST, the port from SLURM_JOB_ID."""
    return {**clean_env(), "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": "fmlab-pretrain", "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
            "SLURM_NODELIST": "127.0.0.[1-2]", "SLURM_JOB_NODELIST": "127.0.0.[1-2]", "SLURM_STEP_ID": "0",
            "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank)}


def test_slurm_two_tasks_match_one_process(setup) -> None:
    """srun's two tasks (one per node), faked by their variables: Lightning detects SLURMEnvironment and takes its
    ranks; the run folder is named after the job, as the README's sbatch script does."""
    root, overrides, single = setup
    port = free_port(15000, 25000)  # SLURMEnvironment's port: 15000 + the job id's last 4 digits
    job_id = f"7{port - 15000:04d}"
    run_dir = root / "slurm" / f"slurm-{job_id}"
    commands = [[sys.executable, "train.py", *overrides, *report(root / "slurm_losses"), f"hydra.run.dir={run_dir}"]
                for _ in (0, 1)]
    run_nodes(commands, [slurm_task_env(rank, job_id) for rank in (0, 1)])
    check_nodes(run_dir, root / "slurm_losses", single, "SLURMEnvironment")
