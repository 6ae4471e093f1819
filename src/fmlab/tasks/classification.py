"""Sequence / image classification or regression on any backbone: a pooled head (fmlab/tasks/heads.py) on `encode`,
fine-tuned by the shared machinery of fmlab/tasks/finetune.py; at test also per-class F1 and a confusion matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassF1Score

from fmlab.errors import check_choice
from fmlab.models.transformer import POOLING
from fmlab.tasks.base import to_plain
from fmlab.tasks.finetune import FinetuneTask
from fmlab.tasks.heads import SequenceClassifier


def plot_confusion_matrix(matrix: torch.Tensor, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix.numpy(), cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            dark = matrix[i, j] > matrix.max() / 2
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class ClassificationTask(FinetuneTask):
    """Logs `*/loss` and `*/acc`, `*/f1` (macro) per split, or `*/mse`, `*/mae`, `*/r2` when num_labels == 1;
    at test also `test/f1_<label>` and `confusion_matrix.png` in the run folder. `pooling=None` takes the
    backbone's (`model.pooling`: cls for BERT and ViT, last for GPT, mean for MiniLM)."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        num_labels: int,
        pooling: str | None = None,
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        head: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, finetune_mode, layer_decay, lora, drop_path)
        head = dict(to_plain(head) or {})
        pooling = pooling or self.model.default_pooling
        check_choice("task.pooling", pooling, POOLING)
        self.save_hyperparameters({**self.hparams, "num_labels": num_labels, "pooling": pooling, "head": head})
        self.num_labels = num_labels
        self.head = SequenceClassifier(self.model.width, num_labels, pooling, **head)
        self.init_metrics()
        if num_labels > 1:
            self.test_per_class = MulticlassF1Score(num_labels, average="none")
            self.test_confusion = MulticlassConfusionMatrix(num_labels)
        self.test_report: dict = {}

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        if self.num_labels > 1:
            self.test_per_class.reset()
            self.test_confusion.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds, labels = self.eval_step(batch, "test")
        if self.num_labels > 1:
            self.test_per_class.update(preds, labels)
            self.test_confusion.update(preds, labels)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.num_labels == 1:
            return
        names = self.label_names()
        per_class = self.test_per_class.compute().cpu()
        for name, value in zip(names, per_class, strict=True):
            self.log(f"test/f1_{name}", value)
        matrix = self.test_confusion.compute().cpu()
        self.test_report = {"labels": names, "confusion_matrix": matrix.tolist()}
        if self.trainer.is_global_zero and self.trainer.default_root_dir:
            path = Path(self.trainer.default_root_dir) / "confusion_matrix.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            plot_confusion_matrix(matrix, names, path)
            self.test_report["confusion_matrix_png"] = str(path)

    def label_names(self) -> list[str]:
        names = self.extra_state.get("labels")
        return list(names) if names and len(names) == self.num_labels else [str(i) for i in range(self.num_labels)]
