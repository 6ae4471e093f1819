"""Downstream heads with what they own: the output layer, its loss, its predictions and its metrics.

A head takes the backbone's hidden states (B, T, C) and the batch; `FinetuneTask` drives any head the same way.
Sequence classification and regression, and per-token tagging (NER), live here; other heads follow the same four
methods (outputs, loss, predictions, metrics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

from fmlab.errors import UserError, check_rate
from fmlab.models.heads import ClassificationHead
from fmlab.tags import IGNORE
from fmlab.tasks.entity_metrics import EntityScores


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


class TokenClassifier(nn.Module):
    """A tag per token (NER, part of speech): dropout and a linear layer on every position -> logits (B, T, L).

    Targets are `labels` (B, T) with IGNORE (-100) where a position has no tag; the loss reads every tagged
    position, the metrics only a word's first sub-token (`word_starts`, when the data labels every sub-token).
    The layout (`classifier` on each hidden state) is Hugging Face's `...ForTokenClassification`.
    """

    hf_head = ("ForTokenClassification", "classifier")  # what export writes it as (fmlab/interop/export.py)

    def __init__(self, n_embd: int, label_names: list[str], dropout: float = 0.1) -> None:
        super().__init__()
        if len(label_names) < 2:
            raise UserError(f"token classification needs at least 2 tags; the data has {label_names}")
        check_rate("task.head.dropout", dropout)
        self.label_names = list(label_names)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_embd, len(label_names))
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    def outputs(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(hidden)).float()

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        # The mean over tagged positions, 0 for a batch without one (all truncated), with no host sync to ask.
        total = F.cross_entropy(outputs.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
        return total / (labels != IGNORE).sum().clamp(min=1)

    def predictions(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted tag ids (B, T), targets (B, T)): the targets IGNORE all but each word's first sub-token."""
        targets = batch["labels"]
        if "word_starts" in batch:
            targets = targets.masked_fill(~batch["word_starts"].bool(), IGNORE)
        return outputs.argmax(dim=-1), targets

    def metrics(self, split: str) -> MetricCollection:
        """`token_acc` per split; entity `precision`, `recall`, `f1` and `f1_<type>` for val and test (the span
        matching costs a Python loop, so training logs the token accuracy only)."""
        metrics: dict = {"token_acc": MulticlassAccuracy(self.num_labels, average="micro", ignore_index=IGNORE)}
        if split != "train":
            metrics["entity"] = EntityScores(self.label_names)
        return MetricCollection(metrics, prefix=f"{split}/")
