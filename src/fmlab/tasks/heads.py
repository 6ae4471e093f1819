"""Downstream heads with what they own: the output layer, its loss, its predictions and its metrics.

A head takes the backbone's hidden states (B, T, C) and the batch; `FinetuneTask` drives any head the same way.
Sequence classification and regression live here; token-level and dense heads follow the same four methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

from fmlab.models.heads import ClassificationHead


class SequenceClassifier(ClassificationHead):
    """One label per sequence or image: pooled states -> logits (B, num_labels); `num_labels=1` regresses."""

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def outputs(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(hidden, batch.get("attention_mask")).float()

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        if self.num_labels == 1:
            return F.mse_loss(outputs.squeeze(-1), labels.float())
        return F.cross_entropy(outputs, labels)

    def predictions(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, targets) in the form the metrics take."""
        if self.num_labels == 1:
            return outputs.squeeze(-1), batch["labels"].float()
        return outputs.argmax(dim=-1), batch["labels"]

    def metrics(self, split: str) -> MetricCollection:
        """`acc` and macro `f1`, or `mse`, `mae`, `r2` for regression, under `<split>/`."""
        if self.num_labels == 1:
            metrics = {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()}
        else:
            metrics = {
                "acc": MulticlassAccuracy(self.num_labels, average="micro"),
                "f1": MulticlassF1Score(self.num_labels, average="macro"),
            }
        return MetricCollection(metrics, prefix=f"{split}/")
