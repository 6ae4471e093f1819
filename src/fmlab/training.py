"""The training run behind train.py: build data, task, callbacks, loggers and trainer from config, then fit."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

import fmlab.config  # noqa: F401  (registers the config resolvers)
from fmlab.tasks.base import Task, to_plain

log = logging.getLogger(__name__)


def instantiate_list(cfg: DictConfig | None, kind: str) -> list[Any]:
    """A dict of `_target_` nodes (callbacks, loggers) -> a list of objects; one log line each."""
    objects = []
    for name, node in (cfg or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("Instantiating %s %s <%s>", kind, name, node._target_)
            objects.append(hydra.utils.instantiate(node))
    return objects


def close_loggers() -> None:
    """Finish a W&B run if one is open, so the next job of a sweep starts clean."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish()


def task_wrapper(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log a failure with the run folder and always close the experiment loggers."""

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return fn(cfg)
        except Exception:
            log.exception("Run failed; its folder is %s", cfg.paths.output_dir)
            raise
        finally:
            close_loggers()

    return wrapped


def build_task(cfg: DictConfig, datamodule: L.LightningDataModule) -> Task:
    """The LightningModule of `cfg.task`, with the model config completed by what the data decides."""
    model_cfg = {**to_plain(cfg.model), **datamodule.model_overrides()}
    log.info("Instantiating task <%s>", cfg.task._target_)
    task = hydra.utils.instantiate(cfg.task, model=model_cfg, _recursive_=False)
    task.extra_state.update(datamodule.extra_state())
    return task


def summary_line(trainer: L.Trainer, initial: dict[str, float]) -> str:
    """One line: best validation loss/perplexity, where it started, the best checkpoint."""
    ckpt = trainer.checkpoint_callback
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    parts = [f"steps {trainer.global_step}"]
    if ckpt is not None and ckpt.best_model_score is not None:
        best = float(ckpt.best_model_score)
        ppl = f" (ppl {math.exp(min(best, 50)):.1f})" if ckpt.monitor == "val/loss" else ""
        parts.append(f"best {ckpt.monitor} {best:.4f}{ppl}")
    elif "val/loss" in metrics:
        parts.append(f"val/loss {metrics['val/loss']:.4f}")
    if "val/loss" in initial:
        parts.append(f"started at {initial['val/loss']:.4f} (ppl {math.exp(min(initial['val/loss'], 50)):.1f})")
    if ckpt is not None and ckpt.best_model_path:
        parts.append(f"checkpoint {ckpt.best_model_path}")
    return "Done: " + ", ".join(parts)


@task_wrapper
def train(cfg: DictConfig) -> float | None:
    """Fit the configured task; returns `cfg.optimized_metric` for sweepers."""
    run_dir = Path(cfg.paths.output_dir)
    print(f"Run folder: {run_dir}")
    L.seed_everything(cfg.seed, workers=True)

    log.info("Instantiating data <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule)
    callbacks = instantiate_list(cfg.get("callbacks"), "callback")
    loggers = instantiate_list(cfg.get("logger"), "logger")
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    if getattr(datamodule, "tokenizer", None) is not None:
        datamodule.tokenizer.save(str(run_dir / "tokenizer.json"))

    initial: dict[str, float] = {}
    if cfg.get("validate_before_fit") and not cfg.get("ckpt_path"):
        initial = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    print(summary_line(trainer, initial))
    print(f"Run folder: {run_dir}")
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric"))
    return None if metric is None else float(metric)
