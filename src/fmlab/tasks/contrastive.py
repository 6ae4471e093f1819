"""Joint-embedding pre-training of an image backbone: SimCLR (Chen et al. 2020).

Each image comes as two independently augmented views (`data.views=2`). The backbone's pooled features go through
a projection MLP, and NT-Xent makes each view pick its twin out of the batch's other 2B - 2 views by cosine
similarity at a temperature. The projector is a pre-training head on the task: fine-tuning loads `model.` only.
`val/top1` is the share of views whose most similar other view is their twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from fmlab.errors import UserError, check_count
from fmlab.models.heads import pool
from fmlab.models.transformer import num_params
from fmlab.tasks.base import Task


def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views' embeddings (B, D) each -> (cosine similarities / temperature (2B, 2B) with each view's own
    similarity masked out, the index of each view's twin (2B,))."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    n = len(z1)
    twins = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return logits.masked_fill(self_mask, float("-inf")), twins


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: each of the 2B views classifies its twin among the others."""
    logits, twins = similarity_logits(z1, z2, temperature)
    return F.cross_entropy(logits, twins)


class Projector(nn.Module):
    """SimCLR's projection head: Linear - BatchNorm - ReLU - Linear."""

    def __init__(self, width: int, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveTask(Task):
    """SimCLR on any image backbone; logs `train/loss`, `val/loss`, `val/top1` and `lr`."""

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, temperature: float = 0.2,
                 projector: dict | None = None, pooling: str | None = None) -> None:
        super().__init__(model, optimizer, scheduler)
        if "pixel_values" not in self.model.input_names:
            raise UserError(f"task=simclr pre-trains image backbones; {type(self.model).__name__} takes "
                            f"{list(self.model.input_names)}")
        if not temperature > 0:
            raise UserError(f"task.temperature={temperature} must be positive")
        projector = {"hidden": 512, "dim": 128, **(projector or {})}
        for name, value in projector.items():
            check_count(f"task.projector.{name}", value)
        self.pooling = pooling or self.model.default_pooling
        self.save_hyperparameters({**self.hparams, "temperature": temperature, "projector": projector,
                                   "pooling": self.pooling})
        self.temperature = temperature
        self.projector = Projector(self.model.width, projector["hidden"], projector["dim"])
        self.val_loss, self.val_top1 = MeanMetric(), MeanMetric()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(pool(self.model.encode(pixel_values=pixel_values), mode=self.pooling))

    def forward(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (B, 2, C, H, W) -> (loss, top-1: the share of views whose most similar other view is their twin).
        Both views go through the backbone as one batch, so BatchNorm sees the two together."""
        if views.dim() != 5 or views.shape[1] != 2:
            raise UserError(f"task=simclr needs two views of each image (data.views=2); got a batch of shape "
                            f"{tuple(views.shape)}")
        b = views.shape[0]
        z = self.embed(torch.cat([views[:, 0], views[:, 1]]))
        logits, twins = similarity_logits(z[:b], z[b:], self.temperature)
        top1 = (logits.argmax(dim=1) == twins).float().mean()
        return F.cross_entropy(logits, twins), top1

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, top1 = self(batch["views"])
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", top1)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_loss.reset()
        self.val_top1.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, top1 = self(batch["views"])
        self.val_loss.update(loss, weight=len(batch["views"]))
        self.val_top1.update(top1, weight=len(batch["views"]))

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/top1", self.val_top1.compute())

    def flops_per_batch(self, batch: dict) -> float:
        """Training FLOPs: two views of each image through the backbone and the projector."""
        views = batch["views"].shape[0] * batch["views"].shape[1]
        return views * (self.model.flops_per_sample() + 6 * num_params(self.projector))
