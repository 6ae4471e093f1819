"""OmegaConf resolvers used by the shipped configs (registered on import)."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf


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
