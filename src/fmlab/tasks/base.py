"""What every objective shares: building the model from its config, AdamW groups, warm-up + cosine."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from omegaconf import OmegaConf
from torch import nn

from fmlab.errors import UserError
from fmlab.models.backbone import build_backbone
from fmlab.resume import rng_states, set_rng_states

log = logging.getLogger(__name__)



def to_plain(value: Any) -> Any:
    """DictConfig/ListConfig -> plain containers, so hyper-parameters pickle-free into checkpoints."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def build_model(model_cfg: dict) -> nn.Module:
    """A `_target_` node naming a model config dataclass (e.g. fmlab.models.GPTConfig) -> the model."""
    return build_backbone(model_cfg)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """LR multiplier: linear warm-up from 0, then cosine decay to `min_lr_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def no_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters that the submodules exempt from weight decay with `no_weight_decay()`
    (timm's contract: a backbone, an MAE decoder...)."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        if callable(getattr(sub, "no_weight_decay", None)):
            names |= {f"{prefix}.{name}" if prefix else name for name in sub.no_weight_decay()}
    return names


def is_decayed(name: str, p: nn.Parameter, exempt: set[str]) -> bool:
    """Weight decay applies to matrices only: not to norms, biases, or what a module exempts."""
    return p.dim() >= 2 and name not in exempt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and the rest (norms, biases, embeddings and tables)."""
    decay, no_decay = [], []
    exempt = no_decay_names(model)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if is_decayed(name, p, exempt) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class TrainingDiverged(UserError):
    """The training loss or the weights stopped being finite: the run stops, no checkpoint is written from them."""


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]


def load_task(path: str | Path, checkpoint: dict[str, Any]) -> Task:
    """The task saved in `path` (read with fmlab.resolve.read_checkpoint), rebuilt from the class and
    hyper-parameters the checkpoint names."""
    if "task_class" not in checkpoint:
        raise UserError(f"{path}: names no task class; it was not written by an fmlab task")
    task_class = hydra.utils.get_class(checkpoint["task_class"])
    log.info("Loading %s from %s", checkpoint["task_class"], path)
    return task_class.load_from_checkpoint(path, map_location="cpu", weights_only=True)


class Task(L.LightningModule):
    """Base LightningModule: holds `self.model` and builds optimizer + per-step schedule from config."""

    def __init__(self, model: dict, optimizer: dict, scheduler: dict) -> None:
        super().__init__()
        model, optimizer, scheduler = to_plain(model), to_plain(optimizer), to_plain(scheduler)
        self.save_hyperparameters({"model": model, "optimizer": optimizer, "scheduler": scheduler})
        self.model = build_model(model)
        self.extra_state: dict[str, Any] = {}  # tokenizer, label names...: saved into checkpoints

    def parameter_groups(self) -> list[dict]:
        return param_groups(self, self.hparams.optimizer.get("weight_decay", 0.0))

    def configure_optimizers(self) -> dict:
        overrides = {}
        clipped = bool(self.trainer.gradient_clip_val)
        if self.hparams.optimizer.get("fused") and self.gradient_scaler() is not None and clipped:
            # Clipping needs unscaled gradients, and a fused optimizer unscales fp16 gradients only inside its step.
            log.info("16-mixed with gradient clipping: task.optimizer.fused=true is turned off for this run")
            overrides["fused"] = False
        optimizer, schedule = self.build_optimizer(int(self.trainer.estimated_stepping_batches), **overrides)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def build_optimizer(self, total_steps: int, **overrides: Any) -> tuple[torch.optim.Optimizer, Any]:
        """The configured optimizer over `parameter_groups()` and its warm-up + cosine schedule over `total_steps`
        (stepped per optimizer step); `overrides` replace optimizer settings."""
        opt_cfg = {**self.hparams.optimizer, **overrides}
        optimizer = hydra.utils.instantiate({**opt_cfg, "_partial_": True})(self.parameter_groups())
        sched = self.hparams.scheduler
        warmup = sched.get("warmup_steps")
        if warmup is None:
            warmup = int(sched.get("warmup_fraction", 0.0) * total_steps)
        warmup = max(1, min(int(warmup), total_steps))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(warmup, total_steps, sched.get("min_lr_ratio", 0.1))
        )
        return optimizer, schedule

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Free the gradients now rather than after the next forward pass (Lightning's order), as a hand-written
        # loop does: the forward pass reuses their memory, which lowers the peak and saves ~1.5 % of a CPU step.
        optimizer.zero_grad(set_to_none=True)

    def gradient_scaler(self) -> Any:
        """fp16's gradient scaler, or None (fp32, bf16: nothing is scaled)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and self.gradient_scaler() is None:
            # Lightning's AMP plugin refuses to clip for any fused optimizer, a guard meant for fp16's scaler:
            # bf16 gradients are not scaled, so clip them as the base plugin does.
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def log_loss_and_ppl(self, split: str, loss: torch.Tensor, prog_bar_ppl: bool = True) -> None:
        """`<split>/loss` and its perplexity `<split>/ppl` (exp of a mean token cross-entropy, capped at e^50)."""
        self.log(f"{split}/loss", loss, prog_bar=True)
        self.log(f"{split}/ppl", math.exp(min(loss.item(), 50.0)), prog_bar=prog_bar_ppl)

    def log_lr(self) -> None:
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        # Checked before backward, so a non-finite loss never reaches an optimizer step or a checkpoint.
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(self.divergence_hint(f"train/loss: {loss.item()} at step {self.global_step}"))
        super().backward(loss, *args, **kwargs)

    def divergence_hint(self, what: str) -> str:
        lr = self.hparams.optimizer.get("lr")
        lr = f"{lr:g}" if isinstance(lr, float) else lr
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        fp16 = f", or fp16 overflows (trainer.precision={precision}: try bf16-mixed)" if "16-" in precision and \
            not precision.startswith("bf") else ""
        return (f"{what}: training diverged, the run stopped and wrote no checkpoint from these weights (the last "
                f"good one is kept); usual cause: the learning rate task.optimizer.lr={lr} is too high{fp16}")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        broken = nonfinite_tensors(checkpoint["state_dict"])
        if broken:
            raise TrainingDiverged(self.divergence_hint(
                f"weights: {len(broken)} tensor(s) not finite at step {self.global_step} (e.g. {broken[0]})"))
        checkpoint["fmlab"] = self.extra_state
        # The class that reads this checkpoint back (eval.py), and the RNG state an exact resume continues from.
        checkpoint["task_class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.extra_state = checkpoint.get("fmlab", {})
        if "rng_states" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            set_rng_states(checkpoint["rng_states"])  # resuming a fit; loading weights elsewhere leaves RNG alone
