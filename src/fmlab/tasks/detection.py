"""Object detection on any image backbone: torchvision's Faster R-CNN over a feature pyramid of the backbone's maps
(fmlab/models/detection.py), fine-tuned by the shared machinery of fmlab/tasks/finetune.py (pretrained loading,
linear probe, LoRA, layer-wise decay).

Metrics (torchmetrics' MeanAveragePrecision, COCO definitions): `*/map` (mAP at IoU 0.5:0.95), `*/map_50`,
`*/map_75` for val and test; at test also `test/ap_<class>` and `detections.png` (truth and predicted boxes).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.detection import MeanAveragePrecision

from fmlab.models.detection import DETECTOR_FILE, DETECTOR_SPEC, build_faster_rcnn, save_detector
from fmlab.models.vit import pair
from fmlab.tasks.base import to_plain
from fmlab.tasks.figures import denormalize, log_figure
from fmlab.tasks.finetune import FinetuneTask

SHOWN = 4  # test images drawn in detections.png
SHOWN_SCORE = 0.5  # predicted boxes drawn from this score up


def targets_of(batch: dict) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": b, "labels": c} for b, c in zip(batch["boxes"], batch["labels"], strict=True)]


class DetectionTask(FinetuneTask):
    """Logs `train/loss` (the sum of the RPN's and the box head's classification and regression losses, each also
    logged), `val/map`, `val/map_50`, `val/map_75`, the same for test plus `test/ap_<class>`. `class_names`: the
    object classes, from the data. `detector`: more FasterRCNN arguments (e.g. box_score_thresh)."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        class_names: list[str],
        anchor_sizes: list[int] | None = None,
        pyramid_channels: int = 128,
        box_head_width: int = 1024,
        detector: dict | None = None,
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, finetune_mode, layer_decay, lora, drop_path)
        class_names, detector = list(class_names), dict(to_plain(detector) or {})
        anchor_sizes = list(anchor_sizes) if anchor_sizes else None
        self.save_hyperparameters({**self.hparams, "class_names": class_names, "anchor_sizes": anchor_sizes,
                                   "pyramid_channels": pyramid_channels, "box_head_width": box_head_width,
                                   "detector": detector})
        cfg = self.model.config
        self.detector = build_faster_rcnn(self.model, len(class_names), pair(cfg.img_size), cfg.in_chans,
                                          anchor_sizes, pyramid_channels, box_head_width, **detector)
        self.class_names = class_names
        self.maps = torch.nn.ModuleDict({s: MeanAveragePrecision(box_format="xyxy", class_metrics=s == "test")
                                         for s in ("val", "test")})
        self.shown: dict = {}
        self.test_report: dict = {}
        self._flops: float | None = None

    def label_names(self) -> list[str]:
        return list(self.class_names)

    def forward(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        """Detections per image (eval mode): `boxes` (N, 4) xyxy, `scores`, `labels` (1..K)."""
        return self.detector(list(batch["pixel_values"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.detector(list(batch["pixel_values"]), targets_of(batch))
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in losses.items()})
        self.log_lr()
        return loss

    def on_validation_epoch_start(self) -> None:
        self.maps["val"].reset()

    def on_test_epoch_start(self) -> None:
        self.maps["test"].reset()
        self.shown = {}

    def eval_step(self, batch: dict, split: str) -> list[dict[str, torch.Tensor]]:
        preds = self(batch)
        self.maps[split].update(preds, targets_of(batch))
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds = self.eval_step(batch, "test")
        if batch_idx == 0:
            self.shown = {"pixels": batch["pixel_values"][:SHOWN].cpu(),
                          "truth": [b.cpu() for b in batch["boxes"][:SHOWN]],
                          "prediction": [{k: v.cpu() for k, v in p.items()} for p in preds[:SHOWN]]}

    def log_eval(self, split: str) -> dict:
        values = self.maps[split].compute()
        self.log_dict({f"{split}/{k}": values[k] for k in ("map", "map_50", "map_75")}, prog_bar=True)
        self.maps[split].reset()
        return values

    def on_validation_epoch_end(self) -> None:
        self.log_eval("val")

    def on_test_epoch_end(self) -> None:
        values = self.log_eval("test")
        per_class = values["map_per_class"].reshape(-1).tolist()
        classes = values["classes"].reshape(-1).tolist()
        ap = {self.class_names[int(c) - 1]: float(v) for c, v in zip(classes, per_class, strict=True)}
        for name, value in ap.items():
            self.log(f"test/ap_{name}", value)
        self.test_report = {"labels": self.label_names(), "ap": ap}
        if self.shown and self.trainer.is_global_zero and self.trainer.default_root_dir:
            path = Path(self.trainer.default_root_dir) / "detections.png"
            plot_detections(self.shown, self.extra_state.get("normalization") or {}, path)
            self.test_report["detections_png"] = str(path)
            log_figure(self.loggers, "test/detections", path)

    def export_head(self, out_dir: Path) -> list[str]:
        """The detector without its backbone beside the exported backbone: `detector.safetensors` and
        `detector.json` (what `fmlab.models.detection.load_detector` rebuilds it from); its note."""
        cfg = self.model.config
        spec = {"class_names": self.class_names, "image_size": list(pair(cfg.img_size)), "in_chans": cfg.in_chans,
                "anchor_sizes": self.hparams.anchor_sizes, "pyramid_channels": self.hparams.pyramid_channels,
                "box_head_width": self.hparams.box_head_width,
                "options": self.hparams.detector}
        save_detector(self.detector, spec, out_dir)
        return [f"the Faster R-CNN (pyramid, RPN, box head) is in {DETECTOR_FILE} ({DETECTOR_SPEC}): "
                "fmlab.models.detection.load_detector(<folder>, backbone) rebuilds it around the backbone"]

    def flops_per_sample(self, seq_len: int | None = None) -> float:
        """Training FLOPs of one image: 3x the detector's forward on one image (torch's FLOP counter, once)."""
        if self._flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            cfg = self.model.config
            device = next(self.parameters()).device
            image = torch.zeros(cfg.in_chans, *pair(cfg.img_size), device=device)
            was_training = self.detector.training
            self.detector.eval()
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    self.detector([image])
            finally:
                self.detector.train(was_training)
            self._flops = 3.0 * counter.get_total_flops()
        return self._flops


def plot_detections(shown: dict, normalization: dict, path: Path) -> None:
    """Each test image with its true boxes (green) and the predicted ones scoring SHOWN_SCORE or more (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    images = denormalize(shown["pixels"], normalization)
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4), squeeze=False)
    for ax, image, truth, pred in zip(axes[0], images, shown["truth"], shown["prediction"], strict=True):
        ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None)
        boxes = [(b, "limegreen") for b in truth] + [(b, "red") for b, s in zip(pred["boxes"], pred["scores"],
                                                                                strict=True) if s >= SHOWN_SCORE]
        for (x0, y0, x1, y1), colour in boxes:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1))
        ax.set_axis_off()
    fig.suptitle(f"truth (green), predicted with score >= {SHOWN_SCORE} (red)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
