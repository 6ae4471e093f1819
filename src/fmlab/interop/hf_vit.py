"""ViT <-> Hugging Face ViT (`ViTModel`, `ViTForImageClassification`).

Hugging Face ViT learns its position table; a fixed sin-cos table (MAE) is written as that parameter and computes
the same. Its classifier reads the [CLS] state after the final LayerNorm, like our `pooling=cls` head; other heads
(mean pooling, a head norm) are written for `hf_modeling.FmlabViTForImageClassification`. Files in
the saved layout (`encoder.layer.N.attention.attention.query`) and in transformers 5's module names
(`layers.N.attention.q_proj`) both load.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from fmlab.interop.common import (
    Classifier,
    KeyMap,
    encoder_fields,
    exported_pooling,
    hf_activation,
    require,
    with_zero_biases,
)

log = logging.getLogger(__name__)

MODEL_TYPE = "vit"
CONFIG_TARGET = "fmlab.models.vit.ViTConfig"
KEYS = KeyMap(
    outer={
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj": "embeddings.patch_embeddings.projection",
        "transformer.ln_f": "layernorm",
    },
    block_theirs="encoder.layer.{}.",
    block={
        "ln_1": "layernorm_before", "attn.proj": "attention.output.dense",
        "ln_2": "layernorm_after", "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense",
    },
    qkv=("attention.attention.query", "attention.attention.key", "attention.attention.value"),
)
# transformers 5 module names -> the saved layout (what `save_pretrained` writes).
MODULE_NAMES = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)
TWIN_POOLING = "cls"  # what the family's own classifier reads
CUSTOM = ("FmlabViTConfig", "FmlabViTForImageClassification", "AutoModelForImageClassification")
HEADS = ("classifier.", "pooler.")  # a fine-tune starts its own head; the pooler is unused by our pooling


def from_hf(hf_config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Hugging Face ViT `config.json` and state dict -> (our ViTConfig node, our state dict)."""
    patch = hf_config.get("patch_size", 16)
    if isinstance(patch, list | tuple):
        if len(set(patch)) != 1:
            raise ValueError(f"config.json: patch_size={patch}; fmlab's ViT needs square patches")
        patch = patch[0]
    size = hf_config.get("image_size", 224)
    model_cfg = {
        "_target_": "fmlab.models.vit.ViTConfig",
        "img_size": list(size) if isinstance(size, list | tuple) else size,
        "patch_size": patch,
        "in_chans": hf_config.get("num_channels", 3),
        "pos_embed": "learned",
        "n_layer": hf_config["num_hidden_layers"],
        "n_head": hf_config["num_attention_heads"],
        "n_embd": hf_config["hidden_size"],
        "intermediate_size": hf_config.get("intermediate_size"),
        "dropout": hf_config.get("hidden_dropout_prob", 0.0),
        "attn_dropout": hf_config.get("attention_probs_dropout_prob", 0.0),
        "bias": True,
        "causal": False,
        "pre_norm": True,
        "norm_eps": hf_config.get("layer_norm_eps", 1e-12),
        "activation": hf_activation(hf_config.get("hidden_act", "gelu"), "config.json hidden_act"),
        **exported_pooling(hf_config),
    }
    dropped = sorted({k.removeprefix("vit.").split(".")[0] for k in state if k.removeprefix("vit.").startswith(HEADS)})
    if dropped:
        log.info("Not loaded from the ViT source (the fine-tune starts its own head): %s", dropped)
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("vit.")
        if key.startswith(HEADS):
            continue
        for pattern, repl in MODULE_NAMES:
            key = re.sub(pattern, repl, key)
        renamed[key] = value
    out = KEYS.from_hf(renamed)
    if not hf_config.get("qkv_bias", True):  # no query/key/value bias: a zero one computes the same
        for key in [k for k in out if k.endswith("attn.qkv.weight")]:
            out[key.removesuffix("weight") + "bias"] = torch.zeros(out[key].shape[0], dtype=out[key].dtype)
    return model_cfg, out


def to_hf(model: nn.Module, head: Classifier | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our ViT (and a classifier head) -> (ViT config.json fields, state dict of ViTModel without its pooler, of
    ViTForImageClassification (cls pooling, no head norm) or of hf_modeling's FmlabViTForImageClassification)."""
    cfg = model.config
    require(cfg.pre_norm, "model.pre_norm=false: Hugging Face ViT is pre-LN only; a post-LN ViT has no twin")
    h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    hf_config = {
        "model_type": MODEL_TYPE,
        "architectures": ["ViTForImageClassification" if head is not None else "ViTModel"],
        **encoder_fields(cfg, "ViT"),
        "layer_norm_eps": cfg.norm_eps,
        "image_size": h if h == w else [h, w],
        "patch_size": cfg.patch_size,
        "num_channels": cfg.in_chans,
        "qkv_bias": True,
        "encoder_stride": cfg.patch_size,
    }
    mapped = KEYS.to_hf(with_zero_biases(model.transformer, model.state_dict()))
    if head is None:
        return hf_config, mapped
    state = {f"vit.{k}": v for k, v in mapped.items()}
    if head.without_twin(TWIN_POOLING):  # mean pooling or a head norm (linear probe: BatchNorm): hf_modeling
        hf_config.update(head.custom_config(MODEL_TYPE, *CUSTOM))
        state.update(head.custom_state("classifier"))
    else:
        state["classifier.weight"], state["classifier.bias"] = head.weight.contiguous(), head.bias.contiguous()
    return hf_config, state


def notes(model: nn.Module) -> list[str]:
    out = []
    if model.config.pos_embed == "sincos":
        out.append("the fixed sin-cos position table is written as ViT's learned position_embeddings")
    return out
