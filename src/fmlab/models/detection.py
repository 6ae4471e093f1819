"""Object detection on any image backbone: torchvision's Faster R-CNN over a feature pyramid built from the
backbone's maps (`Backbone.features`).

A CNN's stages at strides 4 to 32 go through a feature pyramid network (Lin et al. 2017) plus a max-pooled level;
a ViT's single map becomes a simple feature pyramid (ViTDet, Li et al. 2022): a transposed convolution up, the map
itself, and poolings down, each projected to the pyramid's width.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fmlab.errors import UserError


class PyramidBackbone(nn.Module):
    """What torchvision's detectors take: `forward(images) -> OrderedDict` of maps, all `out_channels` wide."""

    def __init__(self, backbone: nn.Module, out_channels: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_channels = out_channels
        channels, strides = backbone.feature_channels(), backbone.feature_strides()
        if len(strides) == 1:  # ViT: one map of patch tokens -> strides s/2, s, 2s, 4s
            c = channels[0]
            self.scales = nn.ModuleList([
                nn.ConvTranspose2d(c, c, 2, stride=2), nn.Identity(), nn.MaxPool2d(2), nn.MaxPool2d(4),
            ])
            self.project = nn.ModuleList([
                nn.Sequential(nn.Conv2d(c, out_channels, 1), nn.Conv2d(out_channels, out_channels, 3, padding=1))
                for _ in self.scales
            ])
            self.keep = None
            self.fpn = None
            self.strides = [strides[0] / 2, strides[0], strides[0] * 2, strides[0] * 4]
        else:  # CNN: the maps at stride 4 and coarser, through an FPN with a pooled top level
            self.keep = [i for i, s in enumerate(strides) if s >= 4]
            self.fpn = FeaturePyramidNetwork([channels[i] for i in self.keep], out_channels,
                                             extra_blocks=LastLevelMaxPool())
            self.strides = [strides[i] for i in self.keep] + [strides[-1] * 2]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.backbone.features(x)
        if self.fpn is None:
            return OrderedDict((str(i), project(scale(maps[0])))
                               for i, (scale, project) in enumerate(zip(self.scales, self.project, strict=True)))
        return self.fpn(OrderedDict((str(i), maps[j]) for i, j in enumerate(self.keep)))


def build_faster_rcnn(backbone: nn.Module, num_classes: int, image_size: tuple[int, int], in_chans: int,
                      anchor_sizes: list[int] | None = None, out_channels: int = 128, box_head_width: int = 1024,
                      **options) -> FasterRCNN:
    """Faster R-CNN with `num_classes` object classes (+ background) over `PyramidBackbone(backbone)`: one anchor
    size per pyramid level (default 4x the level's stride), aspect ratios 0.5 / 1 / 2; images arrive normalised
    at `image_size` (no resize). `box_head_width`: the two fully connected layers of the box head."""
    pyramid = PyramidBackbone(backbone, out_channels)
    levels = pyramid.num_levels
    anchor_sizes = anchor_sizes or [max(1, round(4 * s)) for s in pyramid.strides]
    if len(anchor_sizes) != levels:
        raise UserError(f"task.anchor_sizes={list(anchor_sizes)}: this backbone's pyramid has {levels} levels; "
                        f"give {levels} sizes (one per level) or null")
    anchors = AnchorGenerator(tuple((int(s),) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * levels)
    roi_levels = [str(i) for i in range(levels - (0 if pyramid.fpn is None else 1))]  # not the pooled top
    pool = MultiScaleRoIAlign(roi_levels, output_size=7, sampling_ratio=2)
    # The data module normalises and sizes the images: torchvision's transform neither rescales nor pads them
    # (a ViT takes its own image size only).
    return FasterRCNN(pyramid, num_classes=None, min_size=min(image_size), max_size=max(image_size),
                      image_mean=[0.0] * in_chans, image_std=[1.0] * in_chans, size_divisible=1,
                      rpn_anchor_generator=anchors, box_roi_pool=pool,
                      box_head=TwoMLPHead(out_channels * 7 * 7, box_head_width),
                      box_predictor=FastRCNNPredictor(box_head_width, num_classes + 1), **options)


DETECTOR_FILE, DETECTOR_SPEC = "detector.safetensors", "detector.json"  # what export writes beside the backbone


def save_detector(detector: FasterRCNN, spec: dict, folder: Path) -> None:
    """Everything of the detector but its backbone (pyramid, RPN, box head) as `detector.safetensors`, and
    `spec` (the `build_faster_rcnn` arguments and class names) as `detector.json`."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in detector.state_dict().items()
             if not k.startswith("backbone.backbone.")}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / DETECTOR_FILE))
    (folder / DETECTOR_SPEC).write_text(json.dumps(spec, indent=2))


def load_detector(folder: str | Path, backbone: nn.Module) -> tuple[FasterRCNN, list[str]]:
    """An exported detector (`save_detector`) around `backbone` (the exported backbone, loaded as its family
    loads) -> (the detector in eval mode, its class names)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = json.loads((folder / DETECTOR_SPEC).read_text())
    detector = build_faster_rcnn(backbone, len(spec["class_names"]), tuple(spec["image_size"]), spec["in_chans"],
                                 spec["anchor_sizes"], spec["pyramid_channels"], spec["box_head_width"],
                                 **spec["options"])
    missing, unexpected = detector.load_state_dict(load_file(str(folder / DETECTOR_FILE)), strict=False)
    if unexpected or any(not k.startswith("backbone.backbone.") for k in missing):
        raise ValueError(f"{folder / DETECTOR_FILE} does not match {folder / DETECTOR_SPEC}")
    return detector.eval(), list(spec["class_names"])
