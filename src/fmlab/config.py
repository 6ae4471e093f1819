"""OmegaConf resolvers used by the shipped configs (registered on import), and composing conf/train.yaml outside a
Hydra job (benchmarks, tests)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def wandb_offline() -> bool:
    """W&B runs offline unless WANDB_MODE=online asks to stream."""
    return os.environ.get("WANDB_MODE", "offline") != "online"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group(task_name: str) -> str | None:
    """W&B group shared by the jobs of one sweep (`<task>-<sweep time>`); None outside a sweep."""
    if not is_multirun():
        return None
    return f"{task_name}-{Path(HydraConfig.get().sweep.dir).name}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fmlab.wandb_offline"):
        OmegaConf.register_new_resolver("fmlab.wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("fmlab.sweep_group"):
        OmegaConf.register_new_resolver("fmlab.sweep_group", sweep_group)


register_resolvers()


def compose_train_config(overrides: list[str], output_dir: Path | str | None = None) -> DictConfig:
    """conf/train.yaml composed as `python train.py <overrides>` composes it, with the run folder set: for code
    that builds fmlab's objects without launching a Hydra job."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with read_write(cfg), open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task function sees the job config only
    return cfg
