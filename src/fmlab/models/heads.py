"""Fine-tuning heads shared by every family: pool the hidden states (B, T, C) to (B, C), then a linear layer."""

from __future__ import annotations

import torch
from torch import nn

from fmlab.errors import UserError, check_rate
from fmlab.models.transformer import POOLING


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, mode: str = "cls") -> torch.Tensor:
    """(B, T, C) -> (B, C). `cls`: first position; `mean`: average of real tokens; `last`: last real token
    (what a causal model has read everything by). `attention_mask` (B, T) has 1 for real tokens."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if mode == "last":
        if attention_mask is None:
            return hidden[:, -1]
        # The highest real position. (GPT.encode ignores the mask: causality makes right padding harmless, so
        # batches are padded on the right.)
        positions = torch.arange(hidden.size(1), device=hidden.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"pooling={mode!r}; choose one of {POOLING}")


class ClassificationHead(nn.Module):
    """Pooling, optional norm, dropout and a linear layer: logits (B, num_labels); num_labels=1 regresses.

    `norm`: False, True (LayerNorm) or "batchnorm" (BatchNorm without affine: MAE's linear-probe protocol).
    """

    def __init__(
        self, n_embd: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1, norm: bool | str = False
    ) -> None:
        super().__init__()
        if pooling not in POOLING:
            raise UserError(f"pooling={pooling!r}; choose one of {POOLING}")
        if num_labels < 1:
            raise UserError(f"num_labels={num_labels} must be at least 1")
        self.pooling = pooling
        if norm not in (False, True, None, "batchnorm"):
            raise UserError(f"head norm={norm!r}; choose false, true (LayerNorm) or batchnorm")
        if norm == "batchnorm":
            self.norm = nn.BatchNorm1d(n_embd, affine=False, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(n_embd) if norm else nn.Identity()
        check_rate("task.head.dropout", dropout)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_embd, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(self.norm(pool(hidden, attention_mask, self.pooling))))
