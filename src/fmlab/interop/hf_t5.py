"""T5 <-> Hugging Face T5 (`T5ForConditionalGeneration`, `T5Model`, `T5EncoderModel` folders).

Theirs has separate q/k/v (ours fuses q/k/v, and the cross-attention's k/v), keeps each stack's relative bias in
its first block, and repeats the shared embedding as `encoder.embed_tokens` / `decoder.embed_tokens`. Whether the
decoder output is scaled by d_model ** -0.5 (T5 v1.0, tied output layer) or not (v1.1, its own `lm_head`) is
`tie_word_embeddings` in transformers 4 and `scale_decoder_outputs` in 5, which always ties the tensors: a v1.1
folder from transformers 5 imports as our untied model with `lm_head` a copy of the embedding (the same logits).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fmlab.interop.common import OUR_TO_HF_ACTIVATION, Classifier, hf_activation, require

log = logging.getLogger(__name__)

MODEL_TYPE = "t5"
CONFIG_TARGET = "fmlab.models.t5.T5Config"
TWIN_POOLING = "mean"  # no Hugging Face T5 classifier reads the encoder alone: classifiers are not exported
HEADS = ("classification_head.", "classifier.", "qa_outputs.")  # task heads of theirs: a fine-tune starts its own
SKIPPED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")  # copies, or never used
OUTER = {
    "wte": "shared",
    "lm_head": "lm_head",
    "encoder.relative_bias.table": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
    "decoder.relative_bias.table": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
    "encoder.ln_f": "encoder.final_layer_norm",
    "decoder.ln_f": "decoder.final_layer_norm",
}


def block_names(stack: str, decoder: bool, gated: bool) -> dict[str, tuple[str, ...]]:
    """Our module in a block -> theirs (several: concatenated along the output dimension into ours)."""
    ff = "2" if decoder else "1"
    names = {
        "attn.qkv": ("0.SelfAttention.q", "0.SelfAttention.k", "0.SelfAttention.v"),
        "attn.proj": ("0.SelfAttention.o",),
        "ln_1": ("0.layer_norm",),
        "mlp.fc": (f"{ff}.DenseReluDense.wi_0" if gated else f"{ff}.DenseReluDense.wi",),
        "mlp.proj": (f"{ff}.DenseReluDense.wo",),
        "ln_2": (f"{ff}.layer_norm",),
    }
    if gated:
        names["mlp.up"] = (f"{ff}.DenseReluDense.wi_1",)
    if decoder:
        names.update({
            "cross_attn.q": ("1.EncDecAttention.q",),
            "cross_attn.kv": ("1.EncDecAttention.k", "1.EncDecAttention.v"),
            "cross_attn.proj": ("1.EncDecAttention.o",),
            "ln_cross": ("1.layer_norm",),
        })
    return names


def key_map(n_layer: int, n_decoder_layer: int, gated: bool) -> dict[str, tuple[str, ...]]:
    """Every weight: our state-dict key -> their keys."""
    out = {f"{ours}.weight": (f"{theirs}.weight",) for ours, theirs in OUTER.items()}
    for stack, n, decoder in (("encoder", n_layer, False), ("decoder", n_decoder_layer, True)):
        for i in range(n):
            for ours, theirs in block_names(stack, decoder, gated).items():
                out[f"{stack}.blocks.{i}.{ours}.weight"] = tuple(f"{stack}.block.{i}.layer.{t}.weight" for t in theirs)
    return out


def feed_forward(hf_config: dict) -> tuple[str, bool]:
    """(our activation, gated) from `feed_forward_proj` (`relu`, `gated-gelu`, ...) / `dense_act_fn`."""
    proj = hf_config.get("feed_forward_proj", "relu")
    gated = proj.startswith("gated-")
    act = hf_config.get("dense_act_fn") or ("gelu_new" if proj == "gated-gelu" else proj.split("-")[-1])
    return hf_activation(act, "config.json feed_forward_proj"), gated


def from_hf(hf_config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Hugging Face T5 `config.json` and state dict -> (our T5Config node, our state dict)."""
    activation, gated = feed_forward(hf_config)
    scaled = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
    n_layer = hf_config["num_layers"]
    n_decoder_layer = hf_config.get("num_decoder_layers") or n_layer
    dropout = hf_config.get("dropout_rate", 0.1)
    node = {
        "_target_": CONFIG_TARGET,
        "vocab_size": hf_config["vocab_size"],
        "block_size": hf_config.get("n_positions", 512),
        "n_layer": n_layer,
        "n_decoder_layer": n_decoder_layer,
        "n_head": hf_config["num_heads"],
        "n_embd": hf_config["d_model"],
        "head_size": hf_config["d_kv"],
        "intermediate_size": hf_config["d_ff"],
        "relative_buckets": hf_config.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf_config.get("relative_attention_max_distance", 128),
        "dropout": dropout,
        "attn_dropout": dropout,
        "norm_eps": hf_config.get("layer_norm_epsilon", 1e-6),
        "activation": activation,
        "gated_mlp": gated,
        "tie_embeddings": bool(scaled),
        "decoder_start_id": hf_config.get("decoder_start_token_id", hf_config.get("pad_token_id", 0)) or 0,
    }
    dropped = sorted({k.split(".")[0] for k in state if k.startswith(HEADS)})
    if dropped:
        log.info("Not loaded from the T5 source (a fine-tune starts its own head): %s", dropped)
    theirs = {k.removeprefix("transformer."): v for k, v in state.items() if not k.startswith(HEADS)}
    if "shared.weight" not in theirs and "encoder.embed_tokens.weight" in theirs:  # T5EncoderModel may keep only this
        theirs["shared.weight"] = theirs["encoder.embed_tokens.weight"]
    out, used = {}, set(SKIPPED)
    for ours, names in key_map(n_layer, n_decoder_layer, gated).items():
        if all(name in theirs for name in names):
            out[ours] = torch.cat([theirs[name] for name in names], dim=0)
            used.update(names)
    if scaled:
        out.pop("lm_head.weight", None)  # tied: the output layer is the embedding
    elif "lm_head.weight" not in out and "shared.weight" in theirs and any(k.startswith("decoder.") for k in out):
        out["lm_head.weight"] = theirs["shared.weight"].clone()  # transformers 5 saves an unscaled tied head so
    out.update({k: v for k, v in theirs.items() if k not in used})  # the loader's key check names what is left
    return node, out


def to_hf(model: nn.Module, head: Classifier | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our T5 -> (T5 config.json fields, state dict of T5ForConditionalGeneration)."""
    require(head is None, "a classifier on T5's encoder has no Hugging Face twin (T5ForSequenceClassification reads "
                          "the decoder); export the pre-trained or seq2seq model instead")
    require(model.decoder is not None, "this T5 has no decoder (a classification task stripped it)")
    cfg = model.config
    act = OUR_TO_HF_ACTIVATION[cfg.activation]
    if cfg.gated_mlp:
        require(cfg.activation != "gelu", "model.activation=gelu with model.gated_mlp=true: Hugging Face's "
                                          "gated-gelu is the tanh approximation; use model.activation=gelu_tanh")
        proj = "gated-gelu" if cfg.activation == "gelu_tanh" else f"gated-{act}"
    else:
        proj = "gelu_new" if cfg.activation == "gelu_tanh" else act
    hf_config = {
        "model_type": MODEL_TYPE,
        "architectures": ["T5ForConditionalGeneration"],
        "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.n_embd,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.mlp_width,
        "num_layers": cfg.n_layer,
        "num_decoder_layers": cfg.n_decoder_layer,
        "num_heads": cfg.n_head,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": proj,
        "tie_word_embeddings": cfg.tie_embeddings,  # transformers 4
        "scale_decoder_outputs": cfg.tie_embeddings,  # transformers 5
        "decoder_start_token_id": cfg.decoder_start_id,
        "n_positions": cfg.block_size,
    }
    if cfg.attn_dropout != cfg.dropout:
        log.info("Hugging Face T5 has one dropout rate: dropout_rate=%s (model.attn_dropout=%s is not kept)",
                 cfg.dropout, cfg.attn_dropout)
    names = key_map(cfg.n_layer, cfg.n_decoder_layer, cfg.gated_mlp)
    state = {}
    for key, value in model.state_dict().items():
        require(key in names, f"{key}: no Hugging Face name for this tensor")
        for name, part in zip(names[key], value.chunk(len(names[key]), dim=0), strict=True):
            state[name] = part.contiguous()
    return hf_config, state


def notes(model: nn.Module) -> list[str]:
    return []
