"""Starting any task from pretrained weights (fmlab.resolve finds them): the backbone config a run builds, and
loading the weights into it with a strict key and shape check.

The architecture comes from the source; regularisation (dropout, drop-path) and pooling follow the run's config,
and the image resolution follows the data (a ViT resizes its position table). Weights of the source's
pre-training heads are dropped when the task removed those heads; heads and LoRA adapters only the task has start
fresh.
"""

from __future__ import annotations

import logging

from torch import nn

from fmlab.models.backbone import config_class
from fmlab.models.lora import LORA_PARAMS
from fmlab.resolve import Pretrained, PretrainedError

log = logging.getLogger(__name__)

# What a run may change without changing the architecture.
RUN_FIELDS = ("dropout", "attn_dropout", "drop_path")
# What the data may change: the image resolution (a ViT interpolates its position table, see `position_tables`);
# a config class lists its own in `data_fields` (a CNN also adapts its stem to the channel count).
RESOLUTION_FIELDS = ("img_size",)
# Why a data-decided field can disagree with the source, and what to do.
MISMATCH_HINTS = {
    "in_chans": "convert the images with data.channels={theirs}",
    "vocab_size": "the tokenizer does not match the checkpoint (leave data.tokenizer unset to use the source's)",
}


def backbone_config(pretrained: Pretrained, run_model: dict, data_fields: dict) -> dict:
    """The backbone config node of a run that starts from `pretrained`: the source's architecture, the run's
    regularisation, the data's resolution, and an error where the data disagrees with the architecture."""
    if run_model.get("_target_") != pretrained.family:
        raise PretrainedError(
            f"pretrained={pretrained.source} holds a {pretrained.family} backbone but the run's model is "
            f"{run_model.get('_target_')}; choose the matching model=<family>"
        )
    cfg = dict(pretrained.model)
    cfg.update({k: run_model[k] for k in RUN_FIELDS if k in run_model})
    if "pooling" not in cfg and "pooling" in run_model:
        cfg["pooling"] = run_model["pooling"]
    decided = getattr(config_class(pretrained.family), "data_fields", RESOLUTION_FIELDS)
    cfg.update({k: data_fields[k] for k in decided if k in data_fields})
    for key, value in data_fields.items():
        if key == "vocab_size" and key in cfg and value < cfg[key]:
            continue  # an embedding padded past the tokenizer, as T5's 32,128 rows for 32,100 pieces
        if key in cfg and cfg[key] != value:
            hint = MISMATCH_HINTS.get(key, "choose data that matches the pretrained model").format(theirs=cfg[key])
            raise PretrainedError(
                f"the data gives model.{key}={value} but pretrained={pretrained.source} has {key}={cfg[key]}: {hint}"
            )
    return cfg


def load_backbone(model: nn.Module, pretrained: Pretrained) -> None:
    """Copy the source's weights into `model` (a task's backbone) with a strict key and shape check."""
    heads = tuple(getattr(model, "pretraining_heads", ()))
    own = model.state_dict()
    state, dropped = {}, []
    for key, value in pretrained.state_dict.items():
        if key not in own and key.split(".")[0] in heads:
            dropped.append(key)
        else:
            state[key] = value
    fresh = {k for k in own if k.split(".")[0] in heads or k.rsplit(".", 1)[-1] in LORA_PARAMS}
    missing = sorted(set(own) - set(state) - fresh)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise PretrainedError(
            f"pretrained={pretrained.source} does not fit {type(model).__name__}: "
            f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
        )
    resizable = model.adapted_on_load() if hasattr(model, "adapted_on_load") else set()  # converted while loading
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items() if v.shape != own[k].shape and k not in resizable
    ]
    if wrong:
        raise PretrainedError(f"pretrained={pretrained.source}: shapes differ (source vs model): {wrong}")
    model.load_state_dict(state, strict=False)
    if dropped:
        log.info("Dropped pre-training head weights: %s", sorted({k.split('.')[0] for k in dropped}))
    log.info("Loaded %d pretrained tensors from %s", len(state), pretrained.source)
