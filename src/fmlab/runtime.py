"""How a run uses its hardware: the trainer, derived gradient accumulation, DDP under Hydra (ranks Lightning starts,
and ranks torchrun or srun start), sweep bookkeeping, and FSDP that also runs on CPU."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
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
    log_file_per_rank()


def log_file_per_rank() -> None:
    """A rank > 0 that torchrun or srun started logs to `<job>_rank<r>.log` of the shared run folder, as the ranks
    Lightning starts do (their job name ends in `_rank<r>`), instead of interleaving its lines with rank 0's."""
    rank = rank_zero_only.rank  # from RANK / LOCAL_RANK / SLURM_PROCID, read when Lightning was imported
    if not rank or not HydraConfig.initialized():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and not Path(handler.baseFilename).stem.endswith(f"_rank{rank}"):
            path = Path(handler.baseFilename)
            with handler.lock:
                handler.close()  # reopened on the next record, in append mode, under the new name
                handler.baseFilename = str(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))


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


def steps_between_validations(trainer_cfg: dict) -> None:
    """An integer `val_check_interval` counts training steps across epochs, whatever `check_val_every_n_epoch` the
    stage set (stage=finetune validates every epoch): Lightning would otherwise count batches within one epoch and
    refuse an interval longer than an epoch of few labels."""
    interval = trainer_cfg.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool) and trainer_cfg.get("check_val_every_n_epoch"):
        trainer_cfg["check_val_every_n_epoch"] = None


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """lightning.Trainer from `cfg.trainer`, with accumulation derived from `data.global_batch_size` if set."""
    quiet_console()
    if HydraConfig.initialized():
        launch_ranks_in_this_job()
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in NON_TRAINER_KEYS:
        trainer_cfg.pop(key, None)
    steps_between_validations(trainer_cfg)
    log.info("Instantiating trainer <%s>", trainer_cfg["_target_"])
    trainer: L.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    warn_unshared_run_folder(trainer)
    global_batch = cfg.data.get("global_batch_size")
    if global_batch:
        world = trainer.num_devices * trainer.num_nodes
        trainer.accumulate_grad_batches = accumulation(global_batch, cfg.data.batch_size, world)
        log.info("Global batch %d = %d device(s) x micro-batch %d x %d accumulation step(s)",
                 global_batch, world, cfg.data.batch_size, trainer.accumulate_grad_batches)
    return trainer


def warn_unshared_run_folder(trainer: L.Trainer) -> None:
    """Ranks that torchrun or srun started compose their configs apart: without one `hydra.run.dir` each names its
    own folder from its clock, and checkpoints and logs scatter."""
    env = trainer.strategy.cluster_environment if hasattr(trainer.strategy, "cluster_environment") else None
    if env is None or not env.creates_processes_externally or trainer.world_size < 2 or not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    if hc.mode == RunMode.RUN and not any(o.startswith("hydra.run.dir=") for o in hc.overrides.hydra):
        log.warning("%d ranks started by %s without hydra.run.dir: each may write its own run folder (this one: %s); "
                    "give every rank the same hydra.run.dir", trainer.world_size, type(env).__name__,
                    hc.runtime.output_dir)


class ShardedPrecision(FSDPPrecision):
    """Lightning's FSDP precision, plus clipping by the norm of the whole sharded gradient: Lightning's own refuses
    (`gradient_clip_val` would fail every fmlab run) for want of the root FSDP module, which `FullyShardedStrategy`
    hands it."""

    root: torch.nn.Module | None = None

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        if self.root is None:
            return super().clip_grad_by_norm(optimizer, clip_val)
        self.root.clip_grad_norm_(clip_val)  # all-reduces the shards' squared norms: the norm a single process sees


class FullyShardedStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` (FSDP1), made to work for fmlab runs on GPUs and on CPU over gloo.

    - CPU: Lightning refuses FSDP without a GPU, and passes FSDP no device on CPU, for which torch's FSDP finds no
      accelerator; naming the CPU device works (gloo collectives).
    - Gradient clipping by norm works (`ShardedPrecision`).
    - A stage after another (validate before fit, test after fit) starts from the plain module: FSDP1 wraps the
      blocks in place and leaves 1-D shards behind, which the next wrap cannot take. Each stage that ends normally
      gathers the full weights back into the module and removes the wrappers.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not kwargs.setdefault("use_orig_params", True):
            raise UserError("trainer.strategy.use_orig_params=false: fmlab's FSDP needs true (the optimizer groups "
                            "parameters by name and shape, and each stage re-wraps the module)")
        super().__init__(*args, **kwargs)

    @FSDPStrategy.precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:  # the one Lightning builds from trainer.precision
            plugin = ShardedPrecision(plugin.precision, plugin.scaler)
        self._precision_plugin = plugin

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
        from torch.distributed.fsdp import FullyShardedDataParallel

        device_id = self.root_device if self.root_device.type == "cpu" else self.root_device.index
        model = FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=device_id, **self.kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        if isinstance(self.precision_plugin, ShardedPrecision):
            self.precision_plugin.root = model
        return model

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(self.model, FullyShardedDataParallel):
            return super().setup_optimizers(trainer)
        # The task groups parameters by shape (weight decay on matrices): show it the full parameters, not the 1-D
        # shards. The optimizer keeps the same parameter objects, and builds its state at the first step, on shards.
        with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
            return super().setup_optimizers(trainer)

    def teardown(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        # After an exception the other ranks may be gone: no collective then (the module stays sharded).
        if isinstance(self.model, FullyShardedDataParallel) and trainer is not None and not trainer.interrupted:
            unshard(self.model, self.lightning_module)
            self.model = self.lightning_module
        if isinstance(self.precision_plugin, ShardedPrecision):
            self.precision_plugin.root = None
        super().teardown()


def unshard(root: torch.nn.Module, module: torch.nn.Module) -> None:
    """Turn `module`, wrapped by the FSDP1 `root` with `use_orig_params=True`, back into a plain module holding the
    full weights on every rank (a collective: all ranks call it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import FSDP_FLATTENED

    with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
        full = {id(p): p.detach().clone() for p in module.parameters()}
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FullyShardedDataParallel):
                setattr(parent, name, child.module)
    for p in module.parameters():
        p.data, p.grad = full[id(p)], None
        if hasattr(p, FSDP_FLATTENED):
            delattr(p, FSDP_FLATTENED)  # else the next wrap takes the parameter as managed already and skips it
