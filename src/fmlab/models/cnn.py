"""CNN backbones (ResNet-18/50, EfficientNet-Lite0) from timm, behind the same backbone contract as the transformers.

`encode` returns the last feature map as a sequence of positions (B, H'W', C), so every pooled head (mean pooling)
works unchanged; `features` returns the multi-scale maps (strides 2 to 32) that dense heads read. Layer groups for
layer-wise decay are the stem (0), the stages (1..n) and the head convolution (n + 1). The stem adapts to the data's
channel count when loading weights of another (timm's rule: a grey model sums the RGB filters, which is exactly the
RGB network on a grey image repeated three times).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fmlab.errors import UserError, check_choice, check_rate
from fmlab.models.backbone import Backbone
from fmlab.models.vit import pair

# size -> the timm architecture, where its stem lives and the prefixes of its stages (layer groups 1..n).
PRESETS: dict[str, dict] = {
    "resnet18": {"arch": "resnet18", "stem": ("conv1", "bn1"), "stages": [f"layer{i}" for i in range(1, 5)]},
    "resnet50": {"arch": "resnet50", "stem": ("conv1", "bn1"), "stages": [f"layer{i}" for i in range(1, 5)]},
    # TF's EfficientNet-Lite0 (ReLU6, no squeeze-excite, TF "same" padding, BN eps 1e-3): what the ImageNet weights
    # of fmlab.interop.efficientnet_pytorch were trained as.
    "efficientnet_lite0": {"arch": "tf_efficientnet_lite0", "stem": ("conv_stem", "bn1"),
                           "stages": [f"blocks.{i}" for i in range(7)]},
}


@dataclass
class CNNConfig:
    """A CNN backbone: `size` names the architecture (PRESETS); the data fills `img_size` and `in_chans`."""

    presets: ClassVar[dict] = PRESETS
    # Fields the data decides even when loading weights trained otherwise (the stem adapts, a CNN has no table).
    data_fields: ClassVar[tuple[str, ...]] = ("img_size", "in_chans")

    size: str = "resnet18"
    img_size: int | list[int] | None = None
    in_chans: int | None = None
    drop_path: float = 0.0
    pooling: str = "mean"

    def __post_init__(self) -> None:
        check_choice("model.size", self.size, tuple(PRESETS))
        check_choice("model.pooling", self.pooling, ("mean",))  # a CNN has no class token or last position
        check_rate("model.drop_path", self.drop_path)

    @property
    def arch(self) -> str:
        """The timm architecture of this size."""
        return PRESETS[self.size]["arch"]

    def build(self) -> CNN:
        if self.img_size is None or self.in_chans is None:
            raise UserError("model.img_size and model.in_chans must be set (the image data module sets them)")
        return CNN(self)


class CNN(Backbone):
    """A timm CNN as `self.body`, without its classifier: `encode` -> (B, H'W', C), `features` -> maps."""

    input_names = ("pixel_values",)
    lora_targets = ()  # LoRA adapts linear layers; a CNN has none before its head
    sample_unit = "images"

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        import timm  # a second or so: only runs that build a CNN pay it

        self.config = config
        preset = PRESETS[config.size]
        self.body = timm.create_model(config.arch, pretrained=False, num_classes=0, global_pool="",
                                      in_chans=config.in_chans, drop_path_rate=config.drop_path)
        self.stem_names = tuple(f"body.{name}." for name in preset["stem"])
        self.stage_names = tuple(f"body.{name}." for name in preset["stages"])
        self.stem_conv = f"body.{preset['stem'][0]}.weight"
        self._measured: tuple[int, float] | None = None  # (positions of the last map, forward FLOPs of one image)
        self.register_load_state_dict_pre_hook(self._adapt_stem)

    @property
    def width(self) -> int:
        return self.body.num_features

    @property
    def num_layers(self) -> int:
        return len(self.stage_names)

    def check_images(self, pixel_values: torch.Tensor) -> None:
        cfg = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != cfg.in_chans:
            raise ValueError(f"images of shape {tuple(pixel_values.shape)} do not have model.in_chans={cfg.in_chans}")

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> the last feature map as positions (B, H'W', C)."""
        self.check_images(pixel_values)
        return self.body.forward_features(pixel_values).flatten(2).transpose(1, 2)

    forward = encode

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Images -> the feature map after the stem and after each downsampling stage, finest first (5 maps)."""
        self.check_images(pixel_values)
        return self.body.forward_intermediates(pixel_values, intermediates_only=True)

    def feature_channels(self) -> list[int]:
        """Channels of the maps `features` returns."""
        return [int(info["num_chs"]) for info in self.body.feature_info]

    def feature_strides(self) -> list[int]:
        return [int(info["reduction"]) for info in self.body.feature_info]

    def adapted_on_load(self) -> set[str]:
        return {self.stem_conv}

    def no_weight_decay(self) -> set[str]:
        return set()  # convolution and linear weights decay; norms and biases are 1-D and never do

    def layer_id(self, name: str) -> int:
        """Stem 0, stage i -> i + 1, the rest (EfficientNet's head convolution) num_layers + 1."""
        if name.startswith(self.stem_names):
            return 0
        for i, stage in enumerate(self.stage_names):
            if name.startswith(stage):
                return i + 1
        return self.num_layers + 1

    def measure(self) -> tuple[int, float]:
        """(positions of the last feature map, forward FLOPs of one image), counted once by torch's FLOP counter."""
        if self._measured is None:
            from torch.utils.flop_counter import FlopCounterMode

            weight = next(self.parameters())
            image = torch.zeros(1, self.config.in_chans, *pair(self.config.img_size), device=weight.device)
            was_training = self.training
            self.eval()  # batch statistics of one image are undefined
            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    positions = self.encode(image).shape[1]
            finally:
                self.train(was_training)
            self._measured = (int(positions), float(counter.get_total_flops()))
        return self._measured

    def sequence_length(self) -> int:
        return self.measure()[0]

    def flops_per_sample(self) -> int:
        """Training FLOPs of one image: forward + backward (twice the forward) through every convolution."""
        return int(3 * self.measure()[1])

    def encode_flops(self, seq_len: float | None = None) -> float:
        """Training FLOPs of one image as it trains now: forward only when nothing in the backbone trains."""
        forward = self.measure()[1]
        return 3 * forward if any(p.requires_grad for p in self.parameters()) else forward

    def _adapt_stem(self, module, state_dict, prefix, *args) -> None:
        """Weights of a stem with another input channel count: RGB -> grey sums the filters, grey -> RGB repeats
        them at a third (timm's `adapt_input_conv`)."""
        key = prefix + self.stem_conv
        weight = state_dict.get(key)
        want = self.config.in_chans
        if weight is None or weight.shape[1] == want:
            return
        if weight.shape[1] == 3 and want == 1:
            state_dict[key] = weight.sum(dim=1, keepdim=True)
        elif weight.shape[1] == 1:
            state_dict[key] = weight.repeat(1, want, 1, 1) / want
        else:
            raise UserError(f"weights with a {weight.shape[1]}-channel stem cannot load into model.in_chans={want}")
