"""How a run uses its hardware: the trainer, derived gradient accumulation, DDP under Hydra, sweep bookkeeping."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fmlab.errors import UserError

log = logging.getLogger(__name__)

# Keys of the `trainer` node that configure fmlab, not lightning.Trainer.
NON_TRAINER_KEYS = ("peak_flops",)


# Warnings raised inside Lightning about its own internals, or about its model summary (which fmlab replaces by a
# line): nothing a user can act on.
LIGHTNING_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Precision .* is not supported by the model summary",
)


def quiet_console() -> None:
    """Leave the console to what a user acts on: Lightning's INFO lines (device report, tips, "Seed set") go to the
    run's log file like ours instead of its own console handler; W&B stays silent unless WANDB_SILENT=false (train.py
    prints where its run went); Lightning's warnings about its own internals are dropped."""
    for pattern in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True
    os.environ.setdefault("WANDB_SILENT", "true")


@rank_zero_only
def rank_zero_print(*args: Any) -> None:
    print(*args, flush=True)


def accumulation(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient-accumulation steps so that world_size x micro-batch x steps = global batch."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise UserError(
            f"data.global_batch_size={global_batch_size} is not a multiple of data.batch_size={micro_batch_size} "
            f"x {world_size} device(s) = {per_step}"
        )
    return global_batch_size // per_step


def hydra_rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning runs for DDP rank `local_rank` > 0 of a Hydra job.

    Lightning re-runs `sys.argv`, which under `-m` would start the whole sweep again in every rank. Instead: this
    job's own overrides, its folder as the run folder (one folder for all ranks), and no config copy of its own.
    """
    import __main__

    hc = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, hydra.utils.to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    command += ["--config-name", hc.job.config_name, *hc.overrides.task]
    command += [f'hydra.run.dir="{hc.runtime.output_dir}"', f"hydra.job.name={hc.job.name}_rank{local_rank}",
                "hydra.output_subdir=null"]
    return command, hydra.utils.get_original_cwd()


def launch_ranks_in_this_job() -> None:
    """Make Lightning's script launchers (Trainer's and Fabric's) start DDP ranks with `hydra_rank_command`."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (trainer_launcher, fabric_launcher):
        if hasattr(module, "_hydra_subprocess_cmd"):
            module._hydra_subprocess_cmd = hydra_rank_command
        else:  # pragma: no cover - a Lightning release that moved the hook
            log.warning("%s has no Hydra launch hook; DDP ranks may create their own run folders", module.__name__)


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """lightning.Trainer from `cfg.trainer`, with accumulation derived from `data.global_batch_size` if set."""
    quiet_console()
    if HydraConfig.initialized():
        launch_ranks_in_this_job()
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in NON_TRAINER_KEYS:
        trainer_cfg.pop(key, None)
    log.info("Instantiating trainer <%s>", trainer_cfg["_target_"])
    trainer: L.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    global_batch = cfg.data.get("global_batch_size")
    if global_batch:
        world = trainer.num_devices * trainer.num_nodes
        trainer.accumulate_grad_batches = accumulation(global_batch, cfg.data.batch_size, world)
        log.info("Global batch %d = %d device(s) x micro-batch %d x %d accumulation step(s)",
                 global_batch, world, cfg.data.batch_size, trainer.accumulate_grad_batches)
    return trainer
