"""The run behind eval.py: test a checkpoint of any task on its own data (or other data), write the metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

from fmlab.checks import data_module_node
from fmlab.errors import UserError
from fmlab.resolve import read_checkpoint
from fmlab.runtime import build_trainer, rank_zero_print
from fmlab.tasks.base import load_task, to_plain

log = logging.getLogger(__name__)


def data_node(cfg: DictConfig, checkpoint: dict[str, Any]) -> dict:
    """The training run's data node (saved in the checkpoint), with eval's `data` choices and cache on top."""
    saved = checkpoint.get("fmlab", {}).get("data")
    chosen = {k: v for k, v in to_plain(cfg.get("data") or {}).items() if v is not None}  # unset: the run's value
    node = data_module_node({**(saved or {}), **chosen})
    if "_target_" not in node:
        raise UserError(f"ckpt_path={cfg.ckpt_path}: carries no data config; choose one with data=<preset> "
                        "data._target_=...")
    if "cache_dir" in node:
        node["cache_dir"] = cfg.paths.cache_dir
    return node


def build_datamodule(cfg: DictConfig, checkpoint: dict[str, Any]) -> L.LightningDataModule:
    """The data module, on the checkpoint's own tokenizer wherever the data takes one."""
    node = data_node(cfg, checkpoint)
    tokenizer = checkpoint.get("fmlab", {}).get("tokenizer")
    if tokenizer and "tokenizer" in node:
        node["tokenizer"] = Tokenizer.from_str(tokenizer)
    datamodule = hydra.utils.instantiate(node)
    datamodule.prepare_data()
    return datamodule


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test metrics of `cfg.ckpt_path`, printed and written to `<run folder>/test_metrics.json`."""
    checkpoint = read_checkpoint(cfg.ckpt_path, "ckpt_path")
    task = load_task(cfg.ckpt_path, checkpoint)
    datamodule = build_datamodule(cfg, checkpoint)
    if cfg.trainer.get("precision") is None:  # the precision the run was trained (and tested) in
        cfg = OmegaConf.merge(cfg, {"trainer": {"precision": checkpoint.get("fmlab", {}).get("precision", "32-true")}})
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    results = trainer.test(task, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    report = {"checkpoint": str(cfg.ckpt_path), "metrics": metrics, **getattr(task, "test_report", {})}
    out = Path(cfg.get("output_file") or Path(cfg.paths.output_dir) / "test_metrics.json")
    if trainer.is_global_zero:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    rank_zero_print(json.dumps(metrics, indent=2))
    rank_zero_print(f"Test metrics written to {out}")
    return metrics
