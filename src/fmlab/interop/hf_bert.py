"""BERT <-> Hugging Face BERT (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`, `BertForSequenceClassification`).

Hugging Face BERT is post-LN with separate query/key/value projections (ours are fused). Its sequence classifier
reads the [CLS] state through the pooler (dense + tanh); our head reads it directly, so the export writes a pooler
that is the identity to float precision (dense = s I, tanh(s h) / s = h (1 - (s h)^2 / 3), s = POOLER_SCALE) and a
classifier scaled by 1 / s: the same logits, for inference (a pooler that small is no start for further training).
Other heads (mean or last pooling, a head norm) are written for `hf_modeling.FmlabBertForSequenceClassification`:
BertModel without a pooler, then our head.
"""

from __future__ import annotations

import logging

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

MODEL_TYPE = "bert"
ARCHITECTURE_PREFIX = "Bert"  # <prefix>ForTokenClassification, <prefix>ForQuestionAnswering
CONFIG_TARGET = "fmlab.models.bert.BertConfig"
POOLER_SCALE = 1e-4  # relative error (s h)^2 / 3 < 1e-7 for |h| < 5, far below the 1e-4 the tests ask
KEYS = KeyMap(
    outer={
        "wte": "embeddings.word_embeddings",
        "wpe": "embeddings.position_embeddings",
        "wtt": "embeddings.token_type_embeddings",
        "embed_norm": "embeddings.LayerNorm",
        "pooler.0": "pooler.dense",
        "mlm_head.dense": "cls.predictions.transform.dense",
        "mlm_head.norm": "cls.predictions.transform.LayerNorm",
        "mlm_head.decoder": "cls.predictions.decoder",
        "nsp_head": "cls.seq_relationship",
    },
    block_theirs="encoder.layer.{}.",
    block={
        "attn.proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
        "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense", "ln_2": "output.LayerNorm",
    },
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    skip=("position_ids", "embeddings.token_type_ids"),  # buffers
)
TWIN_POOLING = "cls"  # what the family's own classifier reads
CUSTOM = ("FmlabBertConfig", "FmlabBertForSequenceClassification", "AutoModelForSequenceClassification")
HEADS = ("classifier.", "qa_outputs.")  # a classifier, tagger or span head: a fine-tune starts its own


def from_hf(hf_config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Hugging Face BERT `config.json` and state dict -> (our model config node, our state dict)."""
    act = hf_activation(hf_config.get("hidden_act", "gelu"), "config.json hidden_act")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("config.json: only position_embedding_type='absolute' is supported")
    model_cfg = {
        "_target_": "fmlab.models.bert.BertConfig",
        "vocab_size": hf_config["vocab_size"],
        "block_size": hf_config.get("max_position_embeddings", 512),
        "type_vocab_size": hf_config.get("type_vocab_size", 2),
        "n_layer": hf_config["num_hidden_layers"],
        "n_head": hf_config["num_attention_heads"],
        "n_embd": hf_config["hidden_size"],
        "intermediate_size": hf_config.get("intermediate_size"),
        "dropout": hf_config.get("hidden_dropout_prob", 0.1),
        "attn_dropout": hf_config.get("attention_probs_dropout_prob", 0.1),
        "bias": True,
        "causal": False,
        "pre_norm": False,
        "norm_eps": hf_config.get("layer_norm_eps", 1e-12),
        "activation": act,
        "nsp": False,
        **exported_pooling(hf_config),
    }
    if any(k.startswith(HEADS) for k in state):
        log.info("Not loaded from the BERT source: its sequence classifier (the fine-tune starts its own head)")
    renamed = {}
    for key, value in state.items():
        if key.startswith(HEADS):
            continue
        key = key.removeprefix("bert.").replace(".gamma", ".weight").replace(".beta", ".bias")  # old checkpoints
        renamed["cls.predictions.decoder.bias" if key == "cls.predictions.bias" else key] = value
    out = KEYS.from_hf(renamed)
    if "mlm_head.dense.weight" in out and "mlm_head.decoder.weight" not in out and "wte.weight" in out:
        out["mlm_head.decoder.weight"] = out["wte.weight"]  # tied, so saved files leave it out
    if "pooler.0.weight" in out and "nsp_head.weight" in out:
        model_cfg["nsp"] = True
    return model_cfg, out


def to_hf(model: nn.Module, head: Classifier | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our BERT (and a classifier head) -> (BERT config.json fields, state dict of BertForMaskedLM,
    BertForSequenceClassification (cls pooling, no head norm) or hf_modeling's FmlabBertForSequenceClassification)."""
    cfg = model.config
    require(not cfg.pre_norm, "model.pre_norm=true: Hugging Face BERT is post-LN only; a pre-LN BERT has no twin")
    hf_config = {
        "model_type": MODEL_TYPE,
        "architectures": ["BertForSequenceClassification" if head is not None else "BertForMaskedLM"],
        "vocab_size": cfg.vocab_size,
        **encoder_fields(cfg, "BERT"),
        "max_position_embeddings": cfg.block_size,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }
    # Exported: the backbone, and the MLM head of a pre-training run; not the NSP head (BertForMaskedLM has none).
    ours = {
        k: v for k, v in model.state_dict().items()
        if not k.startswith(("pooler.", "nsp_head.", "mlm_head.decoder.weight"))
        and (head is None or not k.startswith("mlm_head."))
    }
    mapped = KEYS.to_hf(with_zero_biases(model.transformer, ours))
    state = {}
    for key, value in mapped.items():
        if key.startswith("cls."):
            state["cls.predictions.bias" if key == "cls.predictions.decoder.bias" else key] = value
        else:
            state[f"bert.{key}"] = value
    if head is not None and head.without_twin(TWIN_POOLING):  # mean / last pooling or a head norm: hf_modeling
        hf_config.update(head.custom_config(MODEL_TYPE, *CUSTOM))
        state.update(head.custom_state("classifier"))
    elif head is not None:
        eye = torch.eye(cfg.n_embd, dtype=head.weight.dtype)
        state["bert.pooler.dense.weight"] = POOLER_SCALE * eye
        state["bert.pooler.dense.bias"] = torch.zeros(cfg.n_embd, dtype=head.weight.dtype)
        state["classifier.weight"] = (head.weight / POOLER_SCALE).contiguous()
        state["classifier.bias"] = head.bias.contiguous()
    return hf_config, state


def notes(model: nn.Module) -> list[str]:
    """What the export leaves out."""
    return ["the next-sentence-prediction head is not exported (BertForMaskedLM has none)"] if model.nsp_head else []
