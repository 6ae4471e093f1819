"""GPT: token + position embeddings around the causal transformer core, with a tied LM head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fmlab.errors import UserError
from fmlab.models.backbone import Backbone
from fmlab.models.transformer import KVCache, Transformer, TransformerConfig, init_weights, num_params

PRESETS = {
    "mini": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256},  # 5 M with an 8k vocabulary: a laptop CPU
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},  # GPT-2 small, 124 M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
}


@dataclass
class GPTConfig(TransformerConfig):
    presets: ClassVar[dict] = PRESETS
    vocab_size: int = 8192
    block_size: int = 256
    causal: bool = True
    pooling: str = "last"  # a causal model has read the whole sequence at its last token

    def build(self) -> GPT:
        return GPT(self)


class GPT(Backbone):
    input_names = ("input_ids", "attention_mask")
    embedding_names = ("wte", "wpe")
    pretraining_heads = ("lm_head",)

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not config.causal:
            raise UserError("GPT needs model.causal=true")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        init_weights(self, config.n_layer)
        self.lm_head.weight = self.wte.weight  # tied after init so both see the embedding init

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C). Causality makes right padding harmless."""
        start = kv_caches[0].length if kv_caches else 0
        T = input_ids.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))
        return self.transformer(x, kv_caches=kv_caches)

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), mean cross-entropy or None); targets of -100 are ignored."""
        logits = self.lm_head(self.encode(input_ids))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        return num_params(self, exclude=(self.wpe.weight,) if non_embedding else ())

    def tokens_per_sample(self) -> int:
        return self.config.block_size

    def sequence_length(self) -> int:
        return self.config.block_size

    def flops_per_token(self) -> int:
        return self.flops_per_sample() // self.tokens_per_sample()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` after `input_ids` (B, T) with a KV cache; temperature 0 is greedy."""
        cfg = self.config
        if input_ids.size(1) + max_new_tokens > cfg.block_size:
            raise ValueError(
                f"prompt ({input_ids.size(1)}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"model.block_size={cfg.block_size}"
            )
        B, hs = input_ids.size(0), cfg.n_embd // cfg.n_head
        caches = [
            KVCache(B, cfg.n_head, cfg.block_size, hs, input_ids.device, self.wte.weight.dtype)
            for _ in range(cfg.n_layer)
        ]
        out, step_input = input_ids, input_ids
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.encode(step_input, kv_caches=caches)[:, -1, :]).float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            if eos_token_id is not None:
                next_id = next_id.masked_fill(finished[:, None], eos_token_id)
                finished |= next_id.squeeze(1) == eos_token_id
            out, step_input = torch.cat([out, next_id], dim=1), next_id
        return out
