"""OmegaConf resolvers used by the shipped configs (registered on import)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B runs offline unless WANDB_MODE=online asks to stream."""
    return os.environ.get("WANDB_MODE", "offline") != "online"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fmlab.wandb_offline"):
        OmegaConf.register_new_resolver("fmlab.wandb_offline", wandb_offline)


register_resolvers()
