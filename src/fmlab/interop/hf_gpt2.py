"""GPT <-> Hugging Face GPT-2 (`GPT2LMHeadModel`, `GPT2ForSequenceClassification`, `GPT2Model`).

GPT-2 stores its projections as `Conv1D` (weight (in, out)): transposed both ways. The LM head is tied to `wte`.
`GPT2ForSequenceClassification` scores the last non-pad token with a bias-free linear layer; our head's bias is
folded into the final LayerNorm's bias (delta with W delta = b), so the logits are the same and the final hidden
states shift by delta. Other heads (cls or mean pooling, a head norm, a bias that does not fold) are written for
`hf_modeling.FmlabGPT2ForSequenceClassification`: GPT2Model, then our head.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fmlab.interop.common import Classifier, KeyMap, exported_pooling, hf_activation, require, with_zero_biases

log = logging.getLogger(__name__)

MODEL_TYPE = "gpt2"
ARCHITECTURE_PREFIX = "GPT2"  # <prefix>ForTokenClassification, <prefix>ForQuestionAnswering
CONFIG_TARGET = "fmlab.models.gpt.GPTConfig"
KEYS = KeyMap(
    outer={"wte": "wte", "wpe": "wpe", "transformer.ln_f": "ln_f"},
    block_theirs="h.{}.",
    block={
        "ln_1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
        "ln_2": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj",
    },
    conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    skip=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of old checkpoints
)
ACTIVATION_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
TWIN_POOLING = "last"  # what the family's own classifier reads
CUSTOM = ("FmlabGPT2Config", "FmlabGPT2ForSequenceClassification", "AutoModelForSequenceClassification")
HEADS = ("lm_head.", "score.", "classifier.", "qa_outputs.")  # the LM head is tied to wte; task heads start fresh


def from_hf(hf_config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A GPT-2 `config.json` and state dict -> (our GPTConfig node, our state dict)."""
    for key, bad in (("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
                     ("add_cross_attention", True)):
        if hf_config.get(key, not bad) == bad:
            raise ValueError(f"config.json: {key}={bad} has no equivalent in fmlab's GPT")
    n_embd = hf_config["n_embd"]
    act = hf_activation(hf_config.get("activation_function", "gelu_new"), "config.json activation_function")
    model_cfg = {
        "_target_": "fmlab.models.gpt.GPTConfig",
        "vocab_size": hf_config["vocab_size"],
        "block_size": hf_config.get("n_positions", 1024),
        "n_layer": hf_config["n_layer"],
        "n_head": hf_config["n_head"],
        "n_embd": n_embd,
        "intermediate_size": hf_config.get("n_inner") or 4 * n_embd,
        "dropout": hf_config.get("resid_pdrop", 0.1),
        "attn_dropout": hf_config.get("attn_pdrop", 0.1),
        "bias": True,
        "causal": True,
        "pre_norm": True,
        "norm_eps": hf_config.get("layer_norm_epsilon", 1e-5),
        "activation": act,
        **exported_pooling(hf_config),
    }
    dropped = sorted({k.split(".")[0] for k in state if k.startswith(HEADS)})
    if dropped:
        log.info("Not loaded from the GPT-2 source (the LM head is tied to wte): %s", dropped)
    state = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith(HEADS)}
    out = KEYS.from_hf(state)
    if "wte.weight" in out:
        out["lm_head.weight"] = out["wte.weight"]
    return model_cfg, out


def to_hf(model: nn.Module, head: Classifier | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our GPT (and a classifier head) -> (GPT-2 config.json fields, state dict of GPT2LMHeadModel,
    GPT2ForSequenceClassification or hf_modeling's FmlabGPT2ForSequenceClassification)."""
    cfg = model.config
    require(cfg.pre_norm, "model.pre_norm=false: GPT-2 is pre-LN only; a post-LN GPT has no Hugging Face twin")
    require(cfg.causal, "model.causal=false: GPT-2 is causal")
    hf_config = {
        "model_type": MODEL_TYPE,
        "architectures": ["GPT2ForSequenceClassification" if head is not None else "GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_width,
        "activation_function": ACTIVATION_TO_HF[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.attn_dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    state = {f"transformer.{k}": v for k, v in KEYS.to_hf(with_zero_biases(model.transformer, ours)).items()}
    if head is None:
        return hf_config, state
    delta = None if head.without_twin(TWIN_POOLING) else fold_bias(head.weight, head.bias)
    if delta is None:  # cls / mean pooling, a head norm or a bias that does not fold: hf_modeling's class
        hf_config.update(head.custom_config(MODEL_TYPE, *CUSTOM))
        state.update(head.custom_state("score"))
    else:
        state["score.weight"] = head.weight.contiguous()
        state["transformer.ln_f.bias"] = state["transformer.ln_f.bias"] + delta
    return hf_config, state


def fold_bias(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """delta (C,) with weight @ delta == bias: the head's bias moved before its bias-free linear layer; None where
    there is none (the weight has rank below num_labels)."""
    delta = torch.linalg.lstsq(weight.double(), bias.double()[:, None]).solution[:, 0]
    error = (weight.double() @ delta - bias.double()).abs().max().item()
    return delta.to(bias.dtype) if error <= 1e-6 else None
