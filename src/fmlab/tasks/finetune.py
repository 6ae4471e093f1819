"""What every downstream task shares: a backbone without its pre-training heads, a fine-tuning mode (full, linear
probe, LoRA), layer-wise learning-rate decay, and one training / evaluation loop around a head that owns its loss,
predictions and metrics (fmlab/tasks/heads.py). A new downstream task is a head and, if its test report differs,
a subclass with `on_test_epoch_end`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torchmetrics import MeanMetric

from fmlab.errors import UserError, check_rate
from fmlab.models.backbone import Backbone
from fmlab.models.lora import add_lora
from fmlab.models.transformer import num_params
from fmlab.tasks.base import Task, to_plain
from fmlab.tasks.lr_decay import layer_decay_groups

log = logging.getLogger(__name__)
FINETUNE_MODES = ("full", "linear_probe", "lora")
SPLITS = ("train", "val", "test")


class FinetuneTask(Task):
    """A backbone plus `self.head` (built by the subclass with `make_head`); logs `<split>/loss` and the head's
    metrics per split. Modes: `full`, `linear_probe` (backbone frozen and in eval mode), `lora` (adapters on the
    backbone's `lora_targets`); `layer_decay` scales the learning rate per layer (BEiT / MAE)."""

    model: Backbone
    head: nn.Module

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        if drop_path is not None:  # the fine-tuning recipe's stochastic depth, on the backbone it builds
            check_rate("task.drop_path", drop_path)
            model = {**to_plain(model), "drop_path": drop_path}
        super().__init__(model, optimizer, scheduler)
        if finetune_mode not in FINETUNE_MODES:
            raise UserError(f"task.finetune_mode={finetune_mode!r}; choose one of {FINETUNE_MODES}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise UserError(f"task.layer_decay={layer_decay} must be in (0, 1]")
        lora = {"r": 8, "alpha": 16.0, "dropout": 0.0, **(to_plain(lora) or {})}
        lora["targets"] = list(lora.get("targets") or self.model.lora_targets)
        self.save_hyperparameters({**self.hparams, "finetune_mode": finetune_mode, "layer_decay": layer_decay,
                                   "lora": lora, "drop_path": drop_path})
        self.finetune_mode, self.layer_decay = finetune_mode, layer_decay
        self.model.strip_pretraining_heads()
        if finetune_mode == "linear_probe":
            self.model.requires_grad_(False)
            # eval from the start: Lightning's loops restore each submodule's captured mode directly, without
            # calling `train()`, so a backbone left in train mode here would update its BatchNorm statistics
            self.model.eval()
        elif finetune_mode == "lora":
            if not lora["targets"]:
                raise UserError(f"task.finetune_mode=lora: {type(self.model).__name__} has no linear layers LoRA "
                                "adapts; use task.finetune_mode=full or linear_probe")
            adapted = add_lora(self.model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
            log.info("LoRA (r=%d) on %d linear layers", lora["r"], len(adapted))

    def init_metrics(self) -> None:
        """Loss meters and the head's metrics per split; call after `self.head` exists."""
        self.loss_meters = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        # `<split>_metrics`: a ModuleDict key may not shadow a method (`train`)
        self.metrics = nn.ModuleDict({f"{s}_metrics": self.head.metrics(s) for s in SPLITS})

    def train(self, mode: bool = True) -> FinetuneTask:
        super().train(mode)
        if self.finetune_mode == "linear_probe":
            self.model.eval()  # a frozen backbone also keeps dropout off
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's outputs for a batch of backbone inputs (keys `encode` does not take are ignored)."""
        return self.head.outputs(self.model.encode(**self.model.encode_inputs(batch)), batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        loss = self.head.loss(outputs, batch)
        self.metrics["train_metrics"].update(*self.head.predictions(outputs, batch))
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(self.metrics["train_metrics"], on_step=False, on_epoch=True)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        # fresh state tensors: a previous validate() left inference-mode ones
        self.loss_meters["val"].reset()
        self.metrics["val_metrics"].reset()

    def on_test_epoch_start(self) -> None:
        self.loss_meters["test"].reset()
        self.metrics["test_metrics"].reset()

    def eval_step(self, batch: dict, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Update the split's loss and metrics; returns (predictions, targets) for subclasses' extra reports."""
        outputs = self(batch)
        preds, targets = self.head.predictions(outputs, batch)
        self.loss_meters[split].update(self.head.loss(outputs, batch), weight=targets.size(0))
        self.metrics[f"{split}_metrics"].update(preds, targets)
        return preds, targets

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def log_eval(self, split: str) -> None:
        self.log(f"{split}/loss", self.loss_meters[split].compute(), prog_bar=True)
        values = self.metrics[f"{split}_metrics"].compute()
        per_class = {k: v for k, v in values.items() if "/f1_" in k}  # one per class or entity type: logs only
        self.log_dict({k: v for k, v in values.items() if k not in per_class}, prog_bar=True)
        self.log_dict(per_class)
        self.metrics[f"{split}_metrics"].reset()

    def on_validation_epoch_end(self) -> None:
        self.log_eval("val")

    def on_test_epoch_end(self) -> None:
        self.log_eval("test")

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs of this batch as it runs: every sample at the batch's padded length (not `block_size`)."""
        inputs = self.model.encode_inputs(batch)
        samples = next(iter(inputs.values())).shape[0]
        return samples * self.flops_per_sample(self.model.batch_sequence_length(inputs))

    def flops_per_sample(self, seq_len: int | None = None) -> float:
        """Training FLOPs of one sample of `seq_len` positions (default the backbone's longest): `encode` as the
        mode trains it (`Backbone.encode_flops`: a linear probe runs forward only, LoRA computes no gradient for
        frozen weights) plus the head; no vocabulary projection, the pre-training heads are gone."""
        return self.model.encode_flops(seq_len) + self.head_flops()

    def head_flops(self) -> float:
        """Training FLOPs of the head for one sample: 6 per weight, once, since it reads one pooled vector; a head
        on every position (token classification) overrides this."""
        return 6 * num_params(self.head)

    def tokens_per_batch(self, batch: dict[str, torch.Tensor]) -> int | None:
        """Positions this batch feeds the backbone, padding included (the matmuls compute it); None for images."""
        ids = batch.get("input_ids")
        return ids.numel() if ids is not None else None

    def parameter_groups(self) -> list[dict]:
        if self.layer_decay is None:
            return super().parameter_groups()
        opt = self.hparams.optimizer
        return layer_decay_groups(self, opt["lr"], opt.get("weight_decay", 0.0), self.layer_decay)
