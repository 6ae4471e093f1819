"""T5: an encoder-decoder on T5's layers (fmlab/models/t5_layers.py), one shared token embedding, relative position
biases instead of a position table, and a tied (v1.0, scaled by d_model ** -0.5) or separate (v1.1) output layer.

As a `Backbone`, `encode` is the encoder: classification and tagging heads read its states, and the decoder with
the output layer are the pre-training heads those tasks strip. Seq2seq tasks call `forward` (teacher forcing) and
`generate` (KV-cached greedy, sampling or beam search; fmlab/models/seq2seq_search.py).
`from_hf` / `to_hf` (fmlab.interop.hf_t5) map Hugging Face `T5ForConditionalGeneration` folders both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fmlab.errors import UserError, check_choice, check_count
from fmlab.models.backbone import Backbone
from fmlab.models.seq2seq_search import STRATEGIES, beam_search, greedy_or_sample
from fmlab.models.t5_layers import (
    RelativePositionBias,
    T5DecoderBlock,
    T5EncoderBlock,
    causal_bias,
    init_t5_weights,
    key_padding_bias,
)
from fmlab.models.transformer import KVCache, TransformerConfig, training_flops

PRESETS = {  # as many decoder as encoder blocks; v1.0 (ReLU, tied output layer) unless a preset says otherwise
    # 4+4 layers at width 256 (9 M parameters with an 8k vocabulary): pre-trains on a 2-core CPU
    "mini": {"n_layer": 4, "n_head": 4, "n_embd": 256, "intermediate_size": 1024, "block_size": 256},
    "small": {"n_layer": 6, "n_head": 8, "n_embd": 512, "intermediate_size": 2048, "block_size": 512},  # t5-small, 60 M
    "base": {"n_layer": 12, "n_head": 12, "n_embd": 768, "intermediate_size": 3072, "block_size": 512},  # t5-base
    "v1_1-small": {"n_layer": 8, "n_head": 6, "n_embd": 512, "head_size": 64,
                   "intermediate_size": 1024, "activation": "gelu_tanh", "gated_mlp": True, "tie_embeddings": False,
                   "block_size": 512},  # google/t5-v1_1-small and flan-t5-small: gated-GELU, separate output layer
}


@dataclass
class T5Config(TransformerConfig):
    """`n_layer` encoder and `n_decoder_layer` decoder blocks (None: as many); `head_size` (T5's d_kv; None:
    n_embd // n_head); `intermediate_size` is d_ff. `block_size` is the longest input the data feeds it: relative
    positions have no table to outgrow, so it bounds the data, not the model."""

    presets: ClassVar[dict] = PRESETS
    vocab_size: int = 8192
    block_size: int = 512
    n_decoder_layer: int | None = None
    head_size: int | None = None
    relative_buckets: int = 32
    relative_max_distance: int = 128
    gated_mlp: bool = False  # v1.1: act(fc x) * up x
    tie_embeddings: bool = True  # v1.0: the output layer is the embedding, its input scaled by n_embd ** -0.5
    decoder_start_id: int = 0  # the decoder's first input: T5 starts from the pad token (set from the data)
    activation: str = "relu"
    bias: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pooling: str = "mean"  # no [CLS] in T5: a sequence head averages the encoder states

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        check_count("model.n_decoder_layer", self.n_decoder_layer)
        if self.bias:
            raise UserError("model.bias=true: T5 has no biases; set model.bias=false")
        if self.causal:
            raise UserError("model.causal=true: T5's encoder is bidirectional (its decoder is causal by design)")
        if not self.pre_norm:
            raise UserError("model.pre_norm=false: T5 is pre-norm (RMSNorm before each sub-layer)")
        if self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 4:
            raise UserError(f"model.relative_buckets={self.relative_buckets} / model.relative_max_distance="
                            f"{self.relative_max_distance}: need at least 4 buckets and a distance beyond a quarter")

    def check_heads(self) -> None:
        if self.head_size is None:
            super().check_heads()
        else:
            check_count("model.head_size", self.head_size)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def build(self) -> T5:
        return T5(self)


class T5Stack(nn.Module):
    """Blocks sharing one relative position bias, then the final RMSNorm and dropout."""

    def __init__(self, cfg: T5Config, n_layer: int, decoder: bool) -> None:
        super().__init__()
        self.relative_bias = RelativePositionBias(cfg.n_head, cfg.relative_buckets, cfg.relative_max_distance,
                                                  bidirectional=not decoder)
        rates = torch.linspace(0, cfg.drop_path, n_layer).tolist() if n_layer > 1 else [cfg.drop_path]
        block = T5DecoderBlock if decoder else T5EncoderBlock
        self.blocks = nn.ModuleList(block(cfg, rate) for rate in rates)
        self.ln_f = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)


class T5(Backbone):
    input_names = ("input_ids", "attention_mask")
    embedding_names = ("wte",)
    pretraining_heads = ("decoder", "lm_head")  # what only generation needs: classifiers read the encoder
    lora_targets = ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.kv", "mlp.fc", "mlp.up", "mlp.proj")
    is_encoder_decoder = True

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = T5Stack(config, config.n_layer, decoder=False)
        self.decoder: T5Stack | None = None
        self.lm_head: nn.Linear | None = None
        init_t5_weights(self, config)
        self.build_decoder()

    def build_decoder(self) -> None:
        """The decoder and (untied) output layer, freshly initialised; after `strip_pretraining_heads` too."""
        cfg = self.config
        self.decoder = T5Stack(cfg, cfg.n_decoder_layer, decoder=True).to(self.wte.weight.device)
        init_t5_weights(self.decoder, cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False).to(self.wte.weight.device)
            nn.init.normal_(self.lm_head.weight, std=1.0)

    # ---- the stacks -----------------------------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S), padding mask (B, S) with 1 = real token -> encoder states (B, S, C)."""
        S = input_ids.size(1)
        bias = self.encoder.relative_bias(S, S)
        padding = key_padding_bias(attention_mask)
        if padding is not None:
            bias = bias + padding
        x = self.dropout(self.wte(input_ids))
        for block in self.encoder.blocks:
            x = block(x, bias)
        return self.encoder.dropout(self.encoder.ln_f(x))

    def memories(self, encoder_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of every decoder block, computed once per source."""
        return [block.cross_attn.memory(encoder_states) for block in self.require_decoder().blocks]

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memories: list[tuple[torch.Tensor, torch.Tensor]],
        attention_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Decoder ids (B, T) after `kv_caches[0].length` cached ones -> final decoder states (B, T, C).
        `attention_mask` is the source's padding mask: padded source positions are never attended to."""
        decoder = self.require_decoder()
        start = kv_caches[0].length if kv_caches else 0
        T = decoder_input_ids.size(1)
        bias = decoder.relative_bias(T, start + T, q_offset=start)
        if T > 1:
            bias = causal_bias(bias, q_offset=start)
        memory_mask = key_padding_bias(attention_mask)
        x = self.dropout(self.wte(decoder_input_ids))
        for i, block in enumerate(decoder.blocks):
            x = block(x, bias, memories[i], memory_mask, kv_caches[i] if kv_caches else None)
        return decoder.dropout(decoder.ln_f(x))

    def logits(self, decoder_states: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., C) -> vocabulary logits (..., V)."""
        if self.config.tie_embeddings:
            return (decoder_states * self.config.n_embd**-0.5) @ self.wte.weight.t()
        return self.lm_head(decoder_states)

    def forward(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) of the token after each decoder input."""
        memories = self.memories(self.encode(input_ids, attention_mask))
        return self.logits(self.decode(decoder_input_ids, memories, attention_mask))

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Targets (B, T), -100 where ignored -> decoder inputs: the start token, then the targets but the last."""
        start = labels.new_full((labels.size(0), 1), self.config.decoder_start_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.decoder_start_id)

    def require_decoder(self) -> T5Stack:
        if self.decoder is None:
            raise ValueError("this T5 has no decoder: a classification task stripped it")
        return self.decoder

    # ---- generation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        strategy: str = "greedy",
        num_beams: int = 4,
        temperature: float = 1.0,
        top_k: int | None = None,
        length_penalty: float = 1.0,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Target ids (B, max_new_tokens) for sources (B, S), the start token left out; after a row's EOS, EOS.
        `strategy`: greedy, sample (temperature, top_k) or beam (num_beams, length_penalty)."""
        check_choice("strategy", strategy, STRATEGIES)
        check_count("max_new_tokens", max_new_tokens)
        beams = num_beams if strategy == "beam" else 1
        check_count("num_beams", beams)
        encoder_states = self.encode(input_ids, attention_mask)
        if beams > 1:
            encoder_states = encoder_states.repeat_interleave(beams, dim=0)
            attention_mask = attention_mask.repeat_interleave(beams, dim=0) if attention_mask is not None else None
        state_class = CachedDecoding if use_cache else UncachedDecoding
        state = state_class(self, encoder_states, attention_mask, max_new_tokens)
        start = input_ids.new_full((input_ids.size(0),), self.config.decoder_start_id)
        if strategy == "beam":
            return beam_search(state, start, beams, max_new_tokens, eos_id, length_penalty)[0]
        temperature = 0.0 if strategy == "greedy" else temperature
        return greedy_or_sample(state, start, max_new_tokens, eos_id, temperature, top_k, generator)

    # ---- the backbone contract ------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """The embedding and the relative position biases."""
        return {n for n, _ in self.named_parameters() if n == "wte.weight" or ".relative_bias." in n}

    def layer_id(self, name: str) -> int:
        """Embedding 0; encoder block i -> i + 1; decoder block j at the depth of the encoder block it matches
        (scaled when the stacks differ), so both stacks' lower blocks move less; a stack's relative bias with its
        first block; the final norms and output layer on top (n_layer + 1)."""
        n_enc, n_dec = self.config.n_layer, self.config.n_decoder_layer
        parts = name.split(".")
        if parts[0] == "wte":
            return 0
        if parts[0] in ("encoder", "decoder") and parts[1] == "relative_bias":
            return 1
        if parts[0] == "encoder" and parts[1] == "blocks":
            return int(parts[2]) + 1
        if parts[0] == "decoder" and parts[1] == "blocks":
            return max(1, round((int(parts[2]) + 1) * n_enc / n_dec))
        return n_enc + 1

    def tokens_per_sample(self) -> int:
        return self.config.block_size

    def sequence_length(self) -> int:
        return self.config.block_size

    def seq2seq_flops(self, source_len: float, target_len: float) -> float:
        """Training FLOPs of one pair (forward + backward, every weight trained): the encoder over the source, the
        decoder and output layer over the target (cross-attention keys and values over the source), plus the
        cross-attention scores (4 L C S T forward, twice that backward)."""
        cfg = self.config
        encoder = sum(p.numel() for n, p in self.encoder.named_parameters() if "relative_bias" not in n)
        decoder = sum(p.numel() for n, p in self.require_decoder().named_parameters() if "relative_bias" not in n)
        kv = sum(b.cross_attn.kv.weight.numel() for b in self.decoder.blocks)
        output = cfg.vocab_size * cfg.n_embd
        inner = cfg.n_head * cfg.head_dim
        return (training_flops(encoder, cfg.n_layer, inner, source_len)
                + training_flops(decoder - kv + output, cfg.n_decoder_layer, inner, target_len)
                + 6 * kv * source_len + 12 * cfg.n_decoder_layer * inner * source_len * target_len)


class CachedDecoding:
    """A `DecodeState` on T5: per decoder block a self-attention KV cache, and the cross-attention memory."""

    def __init__(self, model: T5, encoder_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int) -> None:
        cfg, N = model.config, encoder_states.size(0)
        self.model, self.attention_mask = model, attention_mask
        self.memories = model.memories(encoder_states)
        dtype = self.memories[0][0].dtype  # what the projections compute in (bf16 under autocast)
        self.caches = [KVCache(N, cfg.n_head, max_new_tokens, cfg.head_dim, encoder_states.device, dtype)
                       for _ in range(cfg.n_decoder_layer)]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model.decode(tokens, self.memories, self.attention_mask, self.caches)
        return self.model.logits(hidden[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        self.memories = [(k[index], v[index]) for k, v in self.memories]
        self.attention_mask = self.attention_mask[index] if self.attention_mask is not None else None
        for cache in self.caches:
            cache.k, cache.v = cache.k[index], cache.v[index]


class UncachedDecoding(CachedDecoding):
    """The same state without caches: the whole prefix through the decoder at every step (the reference)."""

    def __init__(self, model: T5, encoder_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int) -> None:
        self.model, self.attention_mask = model, attention_mask
        self.memories = model.memories(encoder_states)
        self.caches = []
        self.prefix = torch.empty(encoder_states.size(0), 0, dtype=torch.long, device=encoder_states.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix, tokens], dim=1)
        return self.model.logits(self.model.decode(self.prefix, self.memories, self.attention_mask)[:, -1])

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.prefix = self.prefix[index]
