"""The training run behind train.py: build data, task, callbacks, loggers and trainer from config, then fit."""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

import fmlab.config  # noqa: F401  (registers the config resolvers)
from fmlab.callbacks.preemption import exit_preempted
from fmlab.checks import check_run, data_module_node
from fmlab.cli import is_user_error, log_to_file, one_line
from fmlab.config import is_multirun
from fmlab.data.base import DataInfo
from fmlab.errors import UserError
from fmlab.resolve import Pretrained, load_pretrained, tokenizer_json
from fmlab.resume import resolve_ckpt_path, resume_logger_runs
from fmlab.runtime import build_trainer, quiet_console, rank_zero_print
from fmlab.tasks.base import Task, to_plain
from fmlab.tasks.pretrained import backbone_config, load_backbone

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
    wandb = sys.modules.get("wandb")  # not imported: no run to close (and importing it costs a second)
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def task_wrapper(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Log a failure's traceback in the run's log file and always close the experiment loggers.

    The console gets one `error:` line for a user error (fmlab.cli). In a sweep (`-m`) a failed job returns NaN
    instead of raising, so the sweeper records it as failed and runs the rest.
    """

    @functools.wraps(fn)
    def wrapped(cfg: DictConfig) -> Any:
        try:
            return fn(cfg)
        except Exception as err:
            log_to_file(f"Run failed; its folder is {cfg.paths.output_dir}", err)
            if is_multirun():
                log.error("Trial failed: %s", one_line(err) if is_user_error(err) else repr(err))
                return float("nan")
            raise
        finally:
            close_loggers()

    return wrapped


def data_config(cfg: DictConfig) -> dict:
    """The resolved `data` node, minus `global_batch_size` (a trainer matter, see fmlab/runtime.py), with a preset's
    `module` as its `_target_`."""
    node = to_plain(cfg.data)
    node.pop("global_batch_size", None)
    return data_module_node(node)


def run_pretrained(cfg: DictConfig) -> Pretrained | None:
    """The run's `pretrained=` source, resolved once (fmlab.resolve): backbone config, weights, tokenizer."""
    return load_pretrained(str(cfg.pretrained)) if cfg.get("pretrained") else None


def same_vocabulary(ours: str, theirs: str) -> bool:
    return Tokenizer.from_str(ours).get_vocab() == Tokenizer.from_str(theirs).get_vocab()


def build_datamodule(cfg: DictConfig, pretrained: Pretrained | None = None) -> L.LightningDataModule:
    """The data module of `cfg.data`; a text module gets the pretrained source's tokenizer (unless data.tokenizer
    names one, which must then be the same)."""
    node = data_config(cfg)
    if pretrained is not None and pretrained.tokenizer is not None and "tokenizer" in node:
        chosen = node.get("tokenizer")
        if chosen and not same_vocabulary(tokenizer_json(str(chosen)), pretrained.tokenizer):
            raise UserError(
                f"data.tokenizer={chosen}: not the tokenizer pretrained={pretrained.source} was trained with; "
                "leave data.tokenizer unset to use the pretrained source's"
            )
        node["tokenizer"] = Tokenizer.from_str(pretrained.tokenizer)
    log.info("Instantiating data <%s>", node["_target_"])
    return hydra.utils.instantiate(node)


def optimized_value(trainer: L.Trainer, name: str | None) -> float | None:
    """What a sweeper optimises: the best checkpoint's score when it monitors `name`, else the last value."""
    ckpt = trainer.checkpoint_callback
    if name and ckpt is not None and ckpt.monitor == name and ckpt.best_model_score is not None:
        return float(ckpt.best_model_score)
    metric = trainer.callback_metrics.get(name) if name else None
    return None if metric is None else float(metric)


def build_task(cfg: DictConfig, datamodule: L.LightningDataModule, pretrained: Pretrained | None = None) -> Task:
    """The LightningModule of `cfg.task`, with the model config completed by what the data decides
    (`datamodule.describe()`) and, given a pretrained source, its architecture and weights."""
    info: DataInfo = datamodule.describe()
    model_cfg = {**to_plain(cfg.model), **info.model}
    if pretrained is not None:
        model_cfg = backbone_config(pretrained, to_plain(cfg.model), info.model)
    block_size = model_cfg.get("block_size")
    if info.max_length and block_size and info.max_length > block_size:
        raise UserError(f"data.max_length={info.max_length} exceeds the model's block_size={block_size}; lower it")
    log.info("Instantiating task <%s>", cfg.task._target_)
    task = hydra.utils.instantiate(cfg.task, model=model_cfg, **info.task, _recursive_=False)
    if pretrained is not None:
        load_backbone(task.model, pretrained)
    task.extra_state.update(info.state)
    return task


def test_after_fit(trainer: L.Trainer, task: Task, datamodule: L.LightningDataModule, run_dir: Path) -> dict:
    """Test the best checkpoint (the final weights without one) and write `test_metrics.json` in the run folder."""
    ckpt = trainer.checkpoint_callback
    ckpt_path = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
    results = trainer.test(task, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    report = {"checkpoint": ckpt_path, "metrics": metrics, **getattr(task, "test_report", {})}
    if trainer.is_global_zero:
        (run_dir / "test_metrics.json").write_text(json.dumps(report, indent=2))
    log.info("Test metrics (%s): %s", ckpt_path or "final weights", metrics)
    return metrics


def model_line(task: Task) -> str:
    model = task.model
    size = getattr(model.config, "size", None)
    total = sum(p.numel() for p in task.parameters())  # parameters() yields a tied tensor once
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return (f"Model: {type(model).__name__}{f' ({size})' if size else ''} in {type(task).__name__}, "
            f"{total:,} parameters, {trainable:,} trainable")


def wandb_line() -> str | None:
    """Where the W&B run went, and how to upload an offline one."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return None
    folder = Path(wandb.run.dir).parent
    offline = bool(getattr(wandb.run, "offline", True))
    return f"W&B run: {folder}" + (f" (offline; upload with: wandb sync {folder})" if offline else "")


def summary_line(trainer: L.Trainer, initial: dict[str, float]) -> str:
    """One line: best validation loss/perplexity, where it started, the best checkpoint."""
    ckpt = trainer.checkpoint_callback
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    has_ppl = "val/ppl" in metrics  # language models; a perplexity of an MSE or a classifier means nothing
    parts = [f"steps {trainer.global_step}"]
    if ckpt is not None and ckpt.best_model_score is not None:
        best = float(ckpt.best_model_score)
        ppl = f" (ppl {math.exp(min(best, 50)):.1f})" if ckpt.monitor == "val/loss" and has_ppl else ""
        parts.append(f"best {ckpt.monitor} {best:.4f}{ppl}")
    elif "val/loss" in metrics:
        parts.append(f"val/loss {metrics['val/loss']:.4f}")
    if "val/loss" in initial:
        ppl = f" (ppl {math.exp(min(initial['val/loss'], 50)):.1f})" if has_ppl else ""
        parts.append(f"started at {initial['val/loss']:.4f}{ppl}")
    if ckpt is not None and ckpt.best_model_path:
        parts.append(f"checkpoint {ckpt.best_model_path}")
    return "Done: " + ", ".join(parts)


@task_wrapper
def train(cfg: DictConfig) -> float:
    """Fit the configured task; returns `cfg.optimized_metric` for sweepers (NaN where the run has none)."""
    run_dir = Path(cfg.paths.output_dir)
    check_run(cfg)  # before anything slow: the config resolves, the data options fit, the folder takes files
    quiet_console()
    rank_zero_print(f"Run folder: {run_dir}")
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg)  # ckpt_path=<file>, or resume=auto / ckpt_path=last
    callbacks = instantiate_list(cfg.get("callbacks"), "callback")  # cheap, and they check their own options

    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule, pretrained)
    rank_zero_print(model_line(task))
    # What eval.py rebuilds the test from: the data, and the precision the run reports its test metrics in.
    task.extra_state.update(data=data_config(cfg), precision=str(cfg.trainer.precision))
    if cfg.get("compile"):
        task.model.compile()  # in place: state-dict keys and checkpoints stay those of the plain model
    loggers = instantiate_list(resume_logger_runs(cfg, ckpt_path), "logger")  # continue the checkpoint's W&B run
    trainer = build_trainer(cfg, callbacks, loggers)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    tokenizer = datamodule.describe().tokenizer
    if tokenizer is not None and trainer.is_global_zero:
        tokenizer.save(str(run_dir / "tokenizer.json"))

    initial: dict[str, float] = {}
    if cfg.get("validate_before_fit") and not ckpt_path:
        initial = trainer.validate(task, datamodule=datamodule, verbose=False)[0]
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:  # a preemption signal: last.ckpt is saved (fmlab/callbacks/preemption.py)
        exit_preempted(trainer)  # one line, then exit status 75 for the scheduler to requeue
    name = cfg.get("optimized_metric")
    if name and name.startswith("val/") and name not in trainer.callback_metrics:
        trainer.validate(task, datamodule=datamodule, verbose=False)  # no validation ran: the sweeper needs one
    metric = optimized_value(trainer, name)

    if cfg.get("test_after_fit"):
        test_after_fit(trainer, task, datamodule, run_dir)

    rank_zero_print(summary_line(trainer, initial))
    if (line := wandb_line()) is not None:
        rank_zero_print(line)
    rank_zero_print(f"Run folder: {run_dir}")
    return float("nan") if metric is None else metric
