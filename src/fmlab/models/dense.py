"""A decoder from a backbone's feature maps to a prediction per pixel (semantic segmentation).

One design covers both kinds of backbone: from the coarsest map, each step doubles the resolution, concatenates the
backbone's own map of that resolution when it has one (the skip connections of a U-Net over a CNN's stages) and
mixes with two 3x3 convolutions; a ViT gives a single map of patch tokens, so its decoder is a progressive
upsampling one (SETR-PUP, Zheng et al. 2021). Backbones expose the maps through `Backbone.features` and
`Backbone.feature_info` (fmlab/models/backbone.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DECODER_FILE, DECODER_SPEC = "decoder.safetensors", "decoder.json"  # what export writes beside the backbone
IGNORE_MASK = 255  # a mask value no class has: the loss and the metrics skip those pixels


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3 convolution, BatchNorm, ReLU layers (a U-Net's double convolution)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class DenseDecoder(nn.Module):
    """Maps (B, C_i, H / s_i, W / s_i), finest first, with `channels` C_i and `strides` s_i -> logits
    (B, num_classes, H, W). `width` is the decoder's channels at the coarsest map, halved at each step down to
    `min_width`."""

    def __init__(self, channels: list[int], strides: list[int], num_classes: int, width: int = 128,
                 min_width: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"one stride per feature map: {len(channels)} maps, {len(strides)} strides")
        self.skips = {int(s): i for i, s in enumerate(strides[:-1])}  # stride -> which map joins at it
        self.coarsest = strides[-1]
        self.steps = max(0, math.ceil(math.log2(self.coarsest)))
        blocks, c_in = [], channels[-1]
        stride = self.coarsest
        for step in range(self.steps):
            stride = stride / 2
            c_out = max(min_width, width // 2**step)
            skip = self.skips.get(int(stride)) if float(stride).is_integer() else None
            blocks.append(conv_block(c_in + (channels[skip] if skip is not None else 0), c_out))
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(c_in, num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = features[-1]
        stride = self.coarsest
        for block in self.blocks:
            stride = stride / 2
            skip = self.skips.get(int(stride)) if float(stride).is_integer() else None
            if skip is not None:  # up to the skip's own size (odd sizes round as the backbone's convolutions did)
                x = F.interpolate(x, size=features[skip].shape[2:], mode="bilinear", align_corners=False)
                x = torch.cat([x, features[skip].to(x.dtype)], dim=1)
            else:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(x)
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classifier(self.dropout(x))


def save_decoder(decoder: DenseDecoder, spec: dict, folder: Path) -> None:
    """`decoder.safetensors` (its weights, BatchNorm statistics included) and `decoder.json` (`spec`: channels,
    strides, class_names, width) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(folder / DECODER_FILE))
    (folder / DECODER_SPEC).write_text(json.dumps(spec, indent=2))


def load_decoder(folder: str | Path) -> tuple[DenseDecoder, list[str]]:
    """An exported decoder (`save_decoder`) -> (the decoder in eval mode, its class names)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = json.loads((folder / DECODER_SPEC).read_text())
    decoder = DenseDecoder(spec["channels"], spec["strides"], len(spec["class_names"]), width=spec["width"])
    decoder.load_state_dict(load_file(str(folder / DECODER_FILE)))
    return decoder.eval(), list(spec["class_names"])
