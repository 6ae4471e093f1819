"""Continuing a run: which checkpoint to resume from, the random-number state a checkpoint carries, and the logger
runs (W&B) a resumed run continues."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from fmlab.config import is_multirun
from fmlab.errors import UserError
from fmlab.resolve import read_checkpoint

log = logging.getLogger(__name__)

LAST = "last.ckpt"
LOGGER_IDS = "logger_ids"  # checkpoint key: logger kind -> run id (written by fmlab.callbacks.WandbResume)


def find_last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest of `<run_dir>/checkpoints/last.ckpt` and the `hpc_ckpt_*.ckpt` Lightning saves when SLURM
    signals a requeue; else a `last.ckpt` anywhere under `run_dir`."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    found = found or list(run_dir.rglob(LAST))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def latest_run_checkpoint(task_dir: str | Path, exclude: str | Path | None = None) -> Path | None:
    """The most recently written `last.ckpt` of the single runs of one task (`<log_dir>/<task>/<date>/<time>`)."""
    task_dir = Path(task_dir)
    exclude = Path(exclude).resolve() if exclude else None
    candidates = [
        p for p in task_dir.glob(f"*/*/checkpoints/{LAST}")
        if p.parts[-5] != "multirun" and p.parents[1].resolve() != exclude
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """The checkpoint `trainer.fit` continues from.

    `ckpt_path=<file>` is used as given. `resume=auto` or `ckpt_path=last` takes `last.ckpt` of `run_dir=`, else of
    this run's own folder (a requeued job), else (outside sweeps) of the latest earlier run of the same task;
    finding none starts afresh, so one command both starts and continues a preemptible job.
    """
    ckpt_path, resume = cfg.get("ckpt_path"), cfg.get("resume")
    if ckpt_path not in (None, "last"):
        if not Path(ckpt_path).is_file():
            raise UserError(f"ckpt_path={ckpt_path}: no such file")
        return str(ckpt_path)
    if ckpt_path != "last" and resume in (None, False, "never"):
        return None
    if resume not in (None, False, "auto", True) and ckpt_path != "last":
        raise UserError(f"resume={resume!r}; use resume=auto (or ckpt_path=last), or leave it unset")
    run_dir = cfg.get("run_dir")
    if run_dir:
        found = find_last_checkpoint(run_dir)
        if found is None:
            raise UserError(f"run_dir={run_dir}: holds no {LAST} to resume from")
    else:  # this folder first: a requeued job or a fixed hydra.run.dir continues where it stopped
        found = find_last_checkpoint(cfg.paths.output_dir)
        if found is None and not is_multirun():  # a sweep job continues only itself
            found = latest_run_checkpoint(Path(cfg.paths.log_dir) / cfg.task_name, exclude=cfg.paths.output_dir)
    if found is None:
        log.info("resume=auto: no earlier checkpoint of %s; starting afresh", cfg.task_name)
        return None
    log.info("Resuming from %s", found)
    return str(found)


def rng_states() -> dict[str, Any]:
    """Every generator a training step may draw from (dropout, masking, augmentation), as tensors and numbers only
    (checkpoints load with `torch.load(weights_only=True)`)."""
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"algo": str(algo), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def logger_overrides(ckpt_path: str | Path | None) -> dict[str, dict]:
    """Logger arguments that continue the runs a checkpoint was logged to, by logger kind: `{"wandb": {"id": <run
    id>, "resume": "allow"}}` when the checkpoint carries a W&B run id (fmlab.callbacks.WandbResume), else `{}`."""
    if not ckpt_path:
        return {}
    ids = read_checkpoint(ckpt_path).get(LOGGER_IDS) or {}
    return {"wandb": {"id": str(ids["wandb"]), "resume": "allow"}} if ids.get("wandb") else {}


def is_wandb_node(node: Any) -> bool:
    """A logger config node that builds a Lightning `WandbLogger` (or a subclass)."""
    import hydra
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    try:
        target = hydra.utils.get_class(node._target_)
    except Exception:  # noqa: BLE001 - a target that does not import is instantiate's error to report, not ours
        return False
    return isinstance(target, type) and issubclass(target, WandbLogger)


def resume_logger_runs(cfg: DictConfig, ckpt_path: str | Path | None) -> DictConfig | None:
    """`cfg.logger`, its W&B nodes given the run id `ckpt_path` carries (`logger_overrides`, merged in place), so a
    resumed run logs to the W&B run it continues.

    A node that sets `id` or `version` itself keeps it. A sweep job takes the id only from a checkpoint in its own
    folder (the job requeued): jobs that all start from one `ckpt_path=` each get their own run.
    """
    loggers = cfg.get("logger")
    if not ckpt_path or not loggers or rank_zero_only.rank != 0:
        return loggers  # only rank 0 has a W&B run: the other ranks need not read the checkpoint
    names = [name for name, node in loggers.items()
             if is_wandb_node(node) and node.get("id") is None and node.get("version") is None]
    if not names:
        return loggers  # no W&B logger to continue: the checkpoint is not read
    if is_multirun() and not Path(ckpt_path).resolve().is_relative_to(Path(cfg.paths.output_dir).resolve()):
        log.info("Sweep job resumed from %s, outside its folder: it starts its own W&B run", ckpt_path)
        return loggers
    overrides = logger_overrides(ckpt_path).get("wandb")
    if overrides:
        with open_dict(loggers):
            for name in names:
                loggers[name].merge_with(overrides)
        log.info("Continuing W&B run %s", overrides["id"])
    return loggers
