"""Semantic segmentation on any image backbone: a class per pixel from the backbone's feature maps (a U-Net style
decoder over a CNN's stages, progressive upsampling over a ViT's patch tokens: fmlab/models/dense.py), fine-tuned by
the shared machinery of fmlab/tasks/finetune.py (pretrained loading, linear probe, LoRA, layer-wise decay).

Metrics (torchmetrics): mean IoU over the classes (`miou`) and pixel accuracy per split; at test also the IoU of
each class and `segmentation.png` (image / ground truth / prediction) in the run folder and the loggers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from fmlab.errors import UserError, check_rate
from fmlab.models.dense import DECODER_FILE, DECODER_SPEC, IGNORE_MASK, DenseDecoder, save_decoder
from fmlab.models.vit import pair
from fmlab.tasks.base import to_plain
from fmlab.tasks.figures import denormalize, log_figure
from fmlab.tasks.finetune import FinetuneTask

SHOWN = 6  # test images drawn in segmentation.png


class SegmentationHead(nn.Module):
    """Feature maps -> logits (B, classes, H, W); the loss and metrics skip pixels marked IGNORE_MASK (255)."""

    def __init__(self, channels: list[int], strides: list[int], class_names: list[str], width: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise UserError(f"segmentation needs at least 2 classes (background included); the data has {class_names}")
        check_rate("task.head.dropout", dropout)
        self.class_names = list(class_names)
        self.decoder = DenseDecoder(channels, strides, len(class_names), width=width, dropout=dropout)

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def outputs(self, features: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(features, tuple(batch["pixel_values"].shape[2:])).float()

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs, batch["masks"], ignore_index=IGNORE_MASK)

    def predictions(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return outputs.argmax(dim=1), batch["masks"]

    def metrics(self, split: str) -> MetricCollection:
        """`miou` (the mean over classes of intersection over union) and `pixel_acc`, under `<split>/`."""
        n = self.num_labels
        return MetricCollection({
            "miou": MulticlassJaccardIndex(n, average="macro", ignore_index=IGNORE_MASK),
            "pixel_acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_MASK),
        }, prefix=f"{split}/")


class SegmentationTask(FinetuneTask):
    """Logs `*/loss`, `*/miou`, `*/pixel_acc`; at test also `test/iou_<class>` and `segmentation.png`.
    `class_names`: the mask classes, from the data (saved in the checkpoint)."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        class_names: list[str],
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        head: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, finetune_mode, layer_decay, lora, drop_path)
        head = dict(to_plain(head) or {})
        class_names = list(class_names)
        self.save_hyperparameters({**self.hparams, "class_names": class_names, "head": head})
        self.head = SegmentationHead(self.model.feature_channels(), self.model.feature_strides(), class_names, **head)
        self.init_metrics()
        self.test_iou = MulticlassJaccardIndex(len(class_names), average="none", ignore_index=IGNORE_MASK)
        self.shown: dict[str, torch.Tensor] = {}
        self.test_report: dict = {}

    def label_names(self) -> list[str]:
        return list(self.head.class_names)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head.outputs(self.model.features(batch["pixel_values"]), batch)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self.test_iou.reset()
        self.shown = {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds, masks = self.eval_step(batch, "test")
        self.test_iou.update(preds, masks)
        if batch_idx == 0:
            self.shown = {"pixels": batch["pixel_values"][:SHOWN].cpu(), "truth": masks[:SHOWN].cpu(),
                          "prediction": preds[:SHOWN].cpu()}

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        names = self.label_names()
        per_class = self.test_iou.compute().cpu()
        for name, value in zip(names, per_class, strict=True):
            self.log(f"test/iou_{name}", value)
        self.test_report = {"labels": names, "iou": {n: round(float(v), 6) for n, v in zip(names, per_class,
                                                                                            strict=True)}}
        if self.shown and self.trainer.is_global_zero and self.trainer.default_root_dir:
            path = Path(self.trainer.default_root_dir) / "segmentation.png"
            plot_segmentation(self.shown, self.extra_state.get("normalization") or {}, names, path)
            self.test_report["segmentation_png"] = str(path)
            log_figure(self.loggers, "test/segmentation", path)

    def export_head(self, out_dir: Path) -> list[str]:
        """The decoder beside the exported backbone: `decoder.safetensors` and `decoder.json` (what
        `fmlab.models.dense.load_decoder` rebuilds it from); its note."""
        spec = {"channels": self.model.feature_channels(), "strides": self.model.feature_strides(),
                "class_names": self.label_names(), "width": self.hparams.head.get("width", 64)}
        save_decoder(self.head.decoder, spec, out_dir)
        return [f"the segmentation decoder is in {DECODER_FILE} ({DECODER_SPEC}): "
                "fmlab.models.dense.load_decoder(<folder>) rebuilds it; it takes the backbone's feature maps"]

    def head_flops(self) -> float:
        """Training FLOPs of the decoder for one image (forward + backward: 3x the forward), counted once."""
        if getattr(self, "_head_flops", None) is None:
            from torch.utils.flop_counter import FlopCounterMode

            h, w = pair(self.model.config.img_size)
            device = next(self.head.parameters()).device
            maps = [torch.zeros(1, c, max(1, h // s), max(1, w // s), device=device)
                    for c, s in zip(self.model.feature_channels(), self.model.feature_strides(), strict=True)]
            was_training = self.head.training
            self.head.eval()  # batch statistics of one image are undefined
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    self.head.decoder(maps, (h, w))
            finally:
                self.head.train(was_training)
            self._head_flops = 3.0 * counter.get_total_flops()
        return self._head_flops


def colorize(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) class ids -> (H, W, 3) float colours (matplotlib's tab10; ignored pixels white)."""
    import matplotlib

    palette = torch.tensor(matplotlib.colormaps["tab10"].colors, dtype=torch.float32)
    out = palette[mask.clamp(max=len(palette) - 1) % len(palette)]
    out[mask == IGNORE_MASK] = 1.0
    return out


def plot_segmentation(shown: dict[str, torch.Tensor], normalization: dict, names: list[str], path: Path) -> None:
    """A row per image: the image, its true mask, the predicted mask; a legend of the class colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    images = denormalize(shown["pixels"], normalization)
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for i in range(rows):
        image = images[i].permute(1, 2, 0)
        panels = (image.squeeze(-1) if image.shape[-1] == 1 else image, colorize(shown["truth"][i]),
                  colorize(shown["prediction"][i]))
        for ax, panel, title in zip(axes[i], panels, ("image", "truth", "prediction"), strict=True):
            ax.imshow(panel.numpy(), cmap="gray" if panel.dim() == 2 else None, interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title)
    palette = colorize(torch.arange(len(names)).view(1, -1))[0]
    fig.legend(handles=[Patch(color=palette[i].tolist(), label=n) for i, n in enumerate(names)],
               loc="lower center", ncol=min(len(names), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
