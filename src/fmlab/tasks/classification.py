"""Fine-tuning any backbone for sequence / image classification or regression: a pooled head on `encode`.

Batches are dicts of backbone inputs (`input_ids`, `attention_mask`, `token_type_ids` or `pixel_values`...) plus
`labels`; the keys the backbone's `encode` does not take are ignored. Modes: `full`, `linear_probe` (backbone
frozen and in eval mode), `lora` (adapters on the attention/MLP projections); `layer_decay` scales the learning
rate per layer (BEiT / MAE).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

from fmlab.models.heads import ClassificationHead
from fmlab.models.lora import DEFAULT_TARGETS, add_lora
from fmlab.tasks.base import Task, to_plain
from fmlab.tasks.lr_decay import layer_decay_groups

log = logging.getLogger(__name__)
FINETUNE_MODES = ("full", "linear_probe", "lora")
SPLITS = ("train", "val", "test")


def strip_pretraining_heads(model: nn.Module) -> None:
    """Remove the model's objective-specific submodules (MLM head, NSP, LM head...): `encode` does not use them."""
    for name in getattr(model, "pretraining_heads", ()):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def split_metrics(num_labels: int, split: str) -> MetricCollection:
    if num_labels == 1:
        metrics = {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()}
    else:
        metrics = {
            "acc": MulticlassAccuracy(num_labels, average="micro"),
            "f1": MulticlassF1Score(num_labels, average="macro"),
        }
    return MetricCollection(metrics, prefix=f"{split}/")


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


class ClassificationTask(Task):
    """Logs `*/loss` and `*/acc`, `*/f1` (macro) per split, or `*/mse`, `*/mae`, `*/r2` when num_labels == 1;
    at test also `test/f1_<label>` and `confusion_matrix.png` in the run folder."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        num_labels: int,
        pooling: str = "cls",
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        head: dict | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        if finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"task.finetune_mode={finetune_mode!r}; choose one of {FINETUNE_MODES}")
        if layer_decay is not None and not 0 < layer_decay <= 1:
            raise ValueError(f"task.layer_decay={layer_decay} must be in (0, 1]")
        lora = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": list(DEFAULT_TARGETS), **(to_plain(lora) or {})}
        head = dict(to_plain(head) or {})
        self.save_hyperparameters({
            **self.hparams, "num_labels": num_labels, "pooling": pooling, "finetune_mode": finetune_mode,
            "layer_decay": layer_decay, "lora": lora, "head": head,
        })
        self.num_labels, self.finetune_mode, self.layer_decay = num_labels, finetune_mode, layer_decay
        strip_pretraining_heads(self.model)
        self.encode_args = set(inspect.signature(self.model.encode).parameters)
        if finetune_mode == "linear_probe":
            self.model.requires_grad_(False)
        elif finetune_mode == "lora":
            adapted = add_lora(self.model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
            log.info("LoRA (r=%d) on %d linear layers", lora["r"], len(adapted))
        self.head = ClassificationHead(self.model.config.n_embd, num_labels, pooling, **head)
        self.loss_meters = nn.ModuleDict({s: MeanMetric() for s in ("val_loss", "test_loss")})
        self.metrics = nn.ModuleDict({f"{s}_metrics": split_metrics(num_labels, s) for s in SPLITS})
        if num_labels > 1:
            self.test_per_class = MulticlassF1Score(num_labels, average="none")
            self.test_confusion = MulticlassConfusionMatrix(num_labels)
        self.test_report: dict = {}

    def train(self, mode: bool = True) -> ClassificationTask:
        super().train(mode)
        if self.finetune_mode == "linear_probe":
            self.model.eval()  # a frozen backbone also keeps dropout off
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, num_labels) of a batch of backbone inputs."""
        inputs = {k: v for k, v in batch.items() if k in self.encode_args}
        hidden = self.model.encode(**inputs)
        return self.head(hidden, batch.get("attention_mask")).float()

    def loss_and_preds(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, labels = self(batch), batch["labels"]
        if self.num_labels == 1:
            preds = logits.squeeze(-1)
            return F.mse_loss(preds, labels.float()), preds, labels.float()
        return F.cross_entropy(logits, labels), logits.argmax(dim=-1), labels

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, preds, labels = self.loss_and_preds(batch)
        metrics = self.metrics["train_metrics"]
        metrics.update(preds, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True)
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        # fresh state tensors: a previous validate() left inference-mode ones
        self.loss_meters["val_loss"].reset()
        self.metrics["val_metrics"].reset()

    def on_test_epoch_start(self) -> None:
        self.loss_meters["test_loss"].reset()
        self.metrics["test_metrics"].reset()
        if self.num_labels > 1:
            self.test_per_class.reset()
            self.test_confusion.reset()

    def eval_step(self, batch: dict, split: str) -> None:
        loss, preds, labels = self.loss_and_preds(batch)
        self.loss_meters[f"{split}_loss"].update(loss, weight=labels.size(0))
        self.metrics[f"{split}_metrics"].update(preds, labels)
        if split == "test" and self.num_labels > 1:
            self.test_per_class.update(preds, labels)
            self.test_confusion.update(preds, labels)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def log_eval(self, split: str) -> None:
        self.log(f"{split}/loss", self.loss_meters[f"{split}_loss"].compute(), prog_bar=True)
        values = self.metrics[f"{split}_metrics"].compute()
        self.log_dict(values, prog_bar=True)
        self.metrics[f"{split}_metrics"].reset()

    def on_validation_epoch_end(self) -> None:
        self.log_eval("val")

    def on_test_epoch_end(self) -> None:
        self.log_eval("test")
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

    def parameter_groups(self) -> list[dict]:
        if self.layer_decay is None:
            return super().parameter_groups()
        opt = self.hparams.optimizer
        return layer_decay_groups(
            self, self.model.config.n_layer, opt["lr"], opt.get("weight_decay", 0.0), self.layer_decay
        )
