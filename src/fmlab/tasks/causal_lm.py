"""Causal language modelling: predict the next token of packed text windows."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from fmlab.tasks.base import Task


class CausalLMTask(Task):
    """Next-token cross-entropy; logs `train/loss`, `val/loss`, `val/ppl`, `lr`."""

    def __init__(self, model: dict, optimizer: dict, scheduler: dict) -> None:
        super().__init__(model, optimizer, scheduler)
        self.val_loss = MeanMetric()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        _, loss = self.model(batch[:, :-1], batch[:, 1:])
        self.log("train/loss", loss, prog_bar=True)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()  # fresh state tensors: a previous validate() left inference-mode ones

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        _, loss = self.model(batch[:, :-1], batch[:, 1:])
        self.val_loss.update(loss, weight=batch.size(0))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log_eval_loss("val")

    def on_test_epoch_end(self) -> None:
        self.log_eval_loss("test")

    def log_eval_loss(self, split: str) -> None:
        loss = self.val_loss.compute()  # synced across ranks by torchmetrics
        self.val_loss.reset()
        self.log_loss_and_ppl(split, loss)
