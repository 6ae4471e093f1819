"""CNN backbones <-> timm model folders (config.json + model.safetensors, as `timm.models.save_for_hf` writes them):
the export `timm.create_model("local-dir:<folder>", pretrained=True)` loads with its fine-tuned classifier, and the
import `pretrained=<folder>` reads (a timm folder names an `architecture`, not a Hugging Face `model_type`).

A head timm's classifier cannot compute (a head norm, e.g. a linear probe's BatchNorm) is refused by name.
"""

from __future__ import annotations

import torch
from torch import nn

from fmlab.interop.common import Classifier, ExportError
from fmlab.models.cnn import PRESETS

MODEL_TYPE = "timm"
CONFIG_TARGET = "fmlab.models.cnn.CNNConfig"
TWIN_POOLING = "mean"  # timm's global average pool
SIZES = {preset["arch"]: size for size, preset in PRESETS.items()}  # timm architecture -> our size
BODY = "body."


def is_timm_folder(config: dict) -> bool:
    return "architecture" in config and "model_type" not in config


def from_hf(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A timm folder's config.json and weights -> our node and backbone weights (its classifier dropped)."""
    arch = config["architecture"]
    if arch not in SIZES:
        raise ValueError(f"architecture={arch!r} is not a CNN fmlab builds; supported: {sorted(SIZES)}")
    pretrained_cfg = config.get("pretrained_cfg") or {}
    chans, height, width = pretrained_cfg.get("input_size") or (3, 224, 224)
    model_args = config.get("model_args") or {}
    node = {"_target_": CONFIG_TARGET, "size": SIZES[arch], "in_chans": int(model_args.get("in_chans", chans)),
            "img_size": int(height) if height == width else [int(height), int(width)]}
    classifier = pretrained_cfg.get("classifier", "fc")
    weights = {BODY + k: v for k, v in state.items() if k.split(".")[0] != classifier}
    return node, weights


def export_folder(task: nn.Module, head: Classifier | None, names: list[str] | None, normalization: dict,
                  out_dir: str) -> list[str]:
    """Write the task's CNN (and classifier) as a timm folder; returns notes on what it leaves out."""
    import timm

    model = task.model
    cfg = model.config
    if head is not None and head.norm:
        raise ExportError("task.head.norm: timm's classifier is one linear layer after average pooling; export a "
                          "model fine-tuned with task.head.norm=false")
    num_classes = 0 if head is None else int(head.weight.shape[0])
    twin = timm.create_model(cfg.arch, pretrained=False, num_classes=num_classes, in_chans=cfg.in_chans)
    state = {k.removeprefix(BODY): v for k, v in model.state_dict().items()}
    if head is not None:
        classifier = twin.pretrained_cfg.get("classifier", "fc")
        state[f"{classifier}.weight"], state[f"{classifier}.bias"] = head.weight, head.bias
    twin.load_state_dict(state, strict=True)
    height, width = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    data = {"input_size": (cfg.in_chans, height, width), "crop_pct": 1.0, "interpolation": "bilinear",
            **({"mean": tuple(normalization["mean"]), "std": tuple(normalization["std"])} if normalization else {})}
    model_config = {"label_names": names} if names else {}
    timm.models.save_for_hf(twin, out_dir, model_config=model_config, model_args={"in_chans": cfg.in_chans},
                            safe_serialization=True, data_config=data)
    notes = ["a timm folder: timm.create_model('local-dir:<folder>', pretrained=True) loads it"]
    if head is None:
        notes.append("no classifier: the folder is the backbone, num_classes=0")
    return notes
