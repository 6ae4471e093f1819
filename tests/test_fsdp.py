"""FSDP on CPU (trainer=fsdp_cpu: 2 gloo processes, one FSDP unit per transformer block): the training loss of every
step equals DDP's with the same seed and global batch, validation runs before and after fit (the module is re-wrapped
between stages), and the gathered checkpoint loads into a plain one-process run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmlab.evaluation import evaluate
from fmlab.resolve import read_checkpoint
from fmlab.tasks.base import load_task
from tests.conftest import TINY_GPT, compose_config, write_corpus
from tests.test_ddp import last_val_loss, record_losses, step_losses
from tests.test_eval_generate import compose_entry

ROOT = Path(__file__).resolve().parents[1]
# Each rank sees the same micro-batches under FSDP as under DDP; FSDP reduce-scatters the gradient where DDP
# all-reduces it, and clips with a norm summed shard by shard: float summation order alone separates the runs. After
# 6 AdamW steps the per-step losses agree to 5e-7 (measured); 1e-5 leaves room for another thread count.
FSDP_TOLERANCE = 1e-5
STEPS = 6


def train_run(root: Path, name: str, overrides: list[str]) -> Path:
    """train.py in a subprocess (Lightning starts the second rank), into <root>/<name>."""
    run_dir = root / name
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, *record_losses(root / f"{name}_losses"), f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    corpus = write_corpus(root / "corpus", n_docs=30)
    overrides = [o for o in TINY_GPT if not o.startswith(("trainer.devices", "data.batch_size"))] + [
        f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}", f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}", "data.batch_size=4",
    ]
    # validate_before_fit stays on (the default): the sharded run validates, re-wraps, fits and validates again.
    ddp = train_run(root, "ddp", [*overrides, "trainer=ddp_cpu"])
    fsdp = train_run(root, "fsdp", [*overrides, "trainer=fsdp_cpu"])
    return root, ddp, fsdp


def test_fsdp_preset_wraps_each_transformer_block(tmp_path: Path) -> None:
    import hydra

    from fmlab.models.gpt import GPTConfig
    from fmlab.models.transformer import Block
    from fmlab.runtime import FullyShardedStrategy

    cfg = compose_config(["trainer=fsdp_cpu"], tmp_path)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("cpu", 2, 32)
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FullyShardedStrategy) and strategy.kwargs["use_orig_params"]
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy._module_classes == {Block}
    gpt = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64).build()
    units = [m for m in gpt.modules() if isinstance(m, tuple(policy._module_classes))]
    assert units == list(gpt.transformer.blocks), "one unit per block; embeddings and LM head stay in the root"


def test_fsdp_losses_match_ddp(runs) -> None:
    root, ddp, fsdp = runs
    for rank in (0, 1):
        ours, theirs = step_losses(root / "fsdp_losses", rank), step_losses(root / "ddp_losses", rank)
        assert list(ours) == list(theirs) == list(range(1, STEPS + 1))
        for step, loss in theirs.items():
            assert ours[step] == pytest.approx(loss, abs=FSDP_TOLERANCE), f"rank {rank} step {step}: {ours} vs {theirs}"
    assert theirs[STEPS] < theirs[1], "the runs compared are training"
    assert last_val_loss(fsdp) == pytest.approx(last_val_loss(ddp), abs=FSDP_TOLERANCE)
    assert (fsdp / "train_rank1.log").is_file(), "rank 1 logs into the run folder"


def test_fsdp_checkpoint_loads_into_one_process(runs) -> None:
    """The gathered checkpoint holds the full, unprefixed weights: a plain single-process task loads it, and eval.py
    tests it to the metrics of the DDP run's checkpoint."""
    root, ddp, fsdp = runs
    ckpt = {name: read_checkpoint(run / "checkpoints" / "last.ckpt") for name, run in (("ddp", ddp), ("fsdp", fsdp))}
    ours, theirs = ckpt["fsdp"]["state_dict"], ckpt["ddp"]["state_dict"]
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        torch.testing.assert_close(ours[key], value, atol=FSDP_TOLERANCE, rtol=0, msg=key)
    task = load_task(fsdp / "checkpoints" / "last.ckpt", ckpt["fsdp"])
    assert not any(name.startswith("_fsdp") or "_fsdp_wrapped_module" in name for name, _ in task.named_parameters())
    assert ckpt["fsdp"]["global_step"] == STEPS and ckpt["fsdp"]["optimizer_states"]

    metrics = {}
    for name, run in (("ddp", ddp), ("fsdp", fsdp)):
        overrides = [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"paths.cache_dir={root / 'cache'}",
                     "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]
        metrics[name] = evaluate(compose_entry("eval", overrides, root / f"eval_{name}"))
    assert metrics["fsdp"]["test/loss"] == pytest.approx(metrics["ddp"]["test/loss"], abs=FSDP_TOLERANCE)
