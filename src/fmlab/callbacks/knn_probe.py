"""An online probe of an image representation while it pre-trains: at every validation, a weighted k-NN classifier
(cosine similarity, votes weighted by exp(similarity / temperature), as InstDisc and DINO evaluate) over the frozen,
pooled features of a labeled sample of the training split, scored on a sample of the validation split.

Logged as `val/knn_acc`, with its cost as `probe/knn_seconds`; switch it off with `callbacks.knn_probe=null`.
Sources without labels skip it (one log line).
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fmlab.models.heads import pool

log = logging.getLogger(__name__)


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor, k: int,
                temperature: float, num_classes: int) -> torch.Tensor:
    """Labels of `features` by a weighted vote of their `k` most cosine-similar training features."""
    train_features, features = F.normalize(train_features, dim=1), F.normalize(features, dim=1)
    similarity, index = (features @ train_features.T).topk(min(k, len(train_features)), dim=1)
    votes = torch.zeros(len(features), num_classes, device=features.device)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return votes.argmax(dim=1)


class KNNProbe(L.Callback):
    """k-NN accuracy of the backbone's pooled features at every validation (see the module docstring)."""

    def __init__(self, k: int = 20, temperature: float = 0.07, max_train: int = 5000, max_val: int = 1000,
                 batch_size: int = 256, pooling: str | None = None) -> None:
        self.k, self.temperature, self.batch_size, self.pooling = k, temperature, batch_size, pooling
        self.max_train, self.max_val = max_train, max_val
        self.sets = None
        self.disabled = False

    def probe_sets(self, trainer: L.Trainer):
        if self.sets is None and not self.disabled:
            datamodule = trainer.datamodule
            found = datamodule.probe_sets(self.max_train, self.max_val) if hasattr(datamodule, "probe_sets") else None
            if found is None:
                log.info("k-NN probe off: %s has no labeled images to probe with", type(datamodule).__name__)
                self.disabled = True
            self.sets = found
        return self.sets

    @torch.no_grad()
    def embed(self, task: L.LightningModule, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        model = task.model
        mode = self.pooling or model.default_pooling
        features, labels = [], []
        loader = DataLoader(dataset, batch_size=self.batch_size, collate_fn=lambda batch: batch)
        for batch in loader:
            pixels = batch["pixel_values"].to(task.device)
            features.append(pool(model.encode(pixel_values=pixels), mode=mode).float())
            labels.append(batch["labels"].to(task.device))
        return torch.cat(features), torch.cat(labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, task: L.LightningModule) -> None:
        if trainer.sanity_checking or self.probe_sets(trainer) is None:
            return
        start = time.perf_counter()
        was_training = task.model.training
        task.model.eval()
        try:
            train_set, val_set = self.sets
            train_features, train_labels = self.embed(task, train_set)
            val_features, val_labels = self.embed(task, val_set)
        finally:
            task.model.train(was_training)
        classes = int(max(train_labels.max(), val_labels.max())) + 1
        predictions = knn_predict(train_features, train_labels, val_features, self.k, self.temperature, classes)
        accuracy = (predictions == val_labels).float().mean()
        seconds = time.perf_counter() - start
        task.log("val/knn_acc", accuracy, prog_bar=True)
        task.log("probe/knn_seconds", seconds)
        log.info("k-NN probe: accuracy %.4f on %d validation images (%d neighbours' pool), %.1f s",
                 float(accuracy), len(val_labels), len(train_labels), seconds)
