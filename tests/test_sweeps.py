"""Sweeps through train.py -m: a grid, an Optuna search, a failing job that does not stop the others; the shipped
launcher configs compose; W&B runs of one sweep share a group."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from fmlab.training import train
from tests.conftest import TINY_GPT, compose_config, read_metrics, values, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def run_train_py(argv: list[str]) -> None:
    """`python train.py <argv>` in this process (a sweep's jobs run one after another with the basic launcher)."""
    GlobalHydra.instance().clear()
    old_argv = sys.argv
    sys.argv = ["train.py", *argv]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        sys.argv = old_argv
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("sweeps")
    corpus = write_corpus(root / "corpus", n_docs=30)
    overrides = [*TINY_GPT, f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "validate_before_fit=false"]
    return root, overrides


def test_grid_sweep_gives_each_job_a_folder(tiny) -> None:
    root, overrides = tiny
    sweep = root / "grid"
    run_train_py(["-m", *overrides, "task.optimizer.lr=1e-3,3e-3", f"hydra.sweep.dir={sweep}"])
    for job, lr in (("0", 1e-3), ("1", 3e-3)):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert OmegaConf.load(sweep / job / ".hydra" / "config.yaml").task.optimizer.lr == lr


def test_failed_job_does_not_stop_the_sweep(tiny) -> None:
    root, overrides = tiny
    sweep = root / "failing"
    # n_head=3 does not divide n_embd=32: job 0 fails while building its model, job 1 must still run.
    run_train_py(["-m", *overrides, "model.n_head=3,2", f"hydra.sweep.dir={sweep}"])
    assert not (sweep / "0" / "checkpoints").exists()
    assert "Run failed" in (sweep / "0" / "train.log").read_text()
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()


def best_val_losses(sweep: Path, n: int) -> list[float]:
    return [min(values(read_metrics(sweep / str(job)), "val/loss")) for job in range(n)]


def test_optuna_search_runs_its_trials(tiny) -> None:
    root, overrides = tiny
    sweep = root / "optuna"
    run_train_py([*overrides, "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}"])
    assert (sweep / "0" / "checkpoints" / "last.ckpt").is_file()
    assert (sweep / "1" / "checkpoints" / "last.ckpt").is_file()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert "task.optimizer.lr" in results["best_params"]
    assert results["best_value"] == pytest.approx(min(best_val_losses(sweep, 2)), rel=1e-5), "the best trial's value"


def test_trials_without_a_validation_still_return_their_metric(tiny) -> None:
    root, overrides = tiny
    sweep = root / "no-validation"
    # No validation inside fit (val_check_interval beyond max_steps): each trial validates once at the end.
    run_train_py([*overrides, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=4",
                  "trainer.val_check_interval=200", f"hydra.sweep.dir={sweep}"])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(best_val_losses(sweep, 2)), rel=1e-5)


def test_a_failed_trial_returns_nan_and_closes_its_wandb_run(tiny, monkeypatch) -> None:
    import wandb

    root, overrides = tiny
    monkeypatch.setattr("fmlab.training.is_multirun", lambda: True)
    cfg = compose_config([*overrides, "logger=wandb", "task.optimizer.lr=1e12", "trainer.max_steps=20"],
                         root / "failed-trial")
    assert math.isnan(train(cfg)), "a diverged trial is recorded as failed (NaN), not raised"
    assert wandb.run is None, "its W&B run is finished, so the next trial starts its own"


@pytest.mark.parametrize(("launcher", "target"), [("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launcher_configs_compose(launcher: str, target: str, tmp_path: Path) -> None:
    compose_config([f"hydra/launcher={launcher}"], tmp_path)
    hydra_cfg = HydraConfig.get()
    assert hydra_cfg.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert hydra_cfg.launcher.max_num_timeout > 0  # preempted jobs come back and resume=auto continues them


def test_wandb_runs_of_a_sweep_share_a_group(tmp_path: Path) -> None:
    single = compose_config(["logger=wandb"], tmp_path)
    assert single.logger.wandb.group is None
    cfg = compose_config(["logger=wandb", "hydra.mode=MULTIRUN", "hydra.sweep.dir=out/multirun/2026-01-01_10-00-00",
                          "tags=[sweep,gpt]"], tmp_path)
    assert cfg.logger.wandb.group == "gpt_pretrain-2026-01-01_10-00-00"
    assert list(cfg.logger.wandb.tags) == ["sweep", "gpt"]
