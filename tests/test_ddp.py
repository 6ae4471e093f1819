"""DDP on CPU (2 gloo processes) under Hydra: one run folder, and the training loss of every step and the validation
loss of one process with the same global batch; `data.global_batch_size` derives gradient accumulation."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from fmlab.runtime import accumulation
from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]
# Gradients averaged over ranks equal the one-process gradient up to float summation order; the validation set is
# padded by Lightning's distributed sampler to a multiple of 2, which moves the mean by at most one repeated window.
DDP_TOLERANCE = 2e-3
# The training loss of a step has no padding: the two ranks' micro-batches are the one-process batch split in two,
# so only float summation order (the gradient all-reduce) separates the runs.
STEP_TOLERANCE = 1e-5


def last_val_loss(run_dir: Path) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")][-1]


class StepLosses(L.Callback):
    """Each rank's own training loss after every optimizer step, one `step loss` line in <folder>/rank<r>.txt (the
    CSV log holds rank 0's alone)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {float(outputs['loss'])!r}\n")


def record_losses(folder: Path) -> list[str]:
    return [f"+callbacks.step_losses._target_={__name__}.StepLosses", f"+callbacks.step_losses.folder={folder}"]


def step_losses(folder: Path, rank: int) -> dict[int, float]:
    rows = [line.split() for line in (folder / f"rank{rank}.txt").read_text().splitlines()]
    return {int(step): float(loss) for step, loss in rows}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("ddp")
    corpus = write_corpus(root / "corpus", n_docs=30)
    overrides = [o for o in TINY_GPT if not o.startswith("trainer.devices")] + [
        f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=6",
        "trainer.val_check_interval=6", "validate_before_fit=false",
    ]
    train(compose_config([*overrides, "data.batch_size=8", *record_losses(root / "single_losses")], root / "single"))
    return root, overrides


def test_global_batch_size_sets_accumulation(setup) -> None:
    root, overrides = setup
    assert accumulation(64, 8, 2) == 4
    with pytest.raises(ValueError, match="global_batch_size=60"):
        accumulation(60, 8, 2)
    train(compose_config([*overrides, "data.batch_size=4", "data.global_batch_size=8"], root / "accumulated"))
    assert last_val_loss(root / "accumulated") == pytest.approx(last_val_loss(root / "single"), abs=1e-4)


def test_two_process_ddp_matches_one_process(setup) -> None:
    """Run as a one-job sweep (-m): the rank Lightning starts must join this job, not replay the sweep."""
    root, overrides = setup
    sweep = root / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", *overrides, "trainer=ddp_cpu", "data.batch_size=4",
         *record_losses(root / "ddp_losses"), f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml"], "one run folder for both ranks"
    run_dir = sweep / "0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "train_rank1.log").is_file(), "rank 1 logs into the job's folder"
    single = step_losses(root / "single_losses", 0)
    rank0, rank1 = step_losses(root / "ddp_losses", 0), step_losses(root / "ddp_losses", 1)
    assert list(single) == list(rank0) == list(rank1) == [1, 2, 3, 4, 5, 6], "both ranks take every step"
    assert rank0[1] != rank1[1], "each rank trains on its own half of the global batch"
    # Every window holds as many targets, so the one-process batch mean is the mean of the two half-batch means.
    ddp = {step: (rank0[step] + rank1[step]) / 2 for step in single}
    for step, loss in single.items():
        assert ddp[step] == pytest.approx(loss, abs=STEP_TOLERANCE), f"step {step}: {ddp} vs {single}"
    assert single[6] < single[1], "the runs compared are training"
    assert last_val_loss(run_dir) == pytest.approx(last_val_loss(root / "single"), abs=DDP_TOLERANCE)


def test_strategy_presets_compose(tmp_path: Path) -> None:
    """The GPU presets cannot run here; their configs must still build the strategy they promise."""
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy

    from fmlab.models.transformer import Block

    fsdp = compose_config(["trainer=fsdp"], tmp_path)
    strategy = hydra.utils.instantiate(fsdp.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    ddp = compose_config(["trainer=ddp", "trainer.num_nodes=2"], tmp_path)
    assert (ddp.trainer.strategy, ddp.trainer.accelerator, ddp.trainer.num_nodes) == ("ddp", "gpu", 2)
