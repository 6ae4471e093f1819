"""T5's layers (Raffel et al. 2020): bucketed relative position bias, attention without score scaling (T5 folds
1/sqrt(d) into its initialisation), ReLU or gated-GELU feed-forward, RMSNorm pre-norm blocks, no biases anywhere.

An encoder block is self-attention + feed-forward; a decoder block adds cross-attention over the encoder states
between them. The first layer's relative bias is computed once per stack and shared by every block (as in T5).
`init_t5_weights` is Mesh TensorFlow's initialisation, which T5 was trained with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmlab.models.transformer import ACTIVATIONS, DropPath, KVCache, TransformerConfig


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: half the buckets hold exact distances, the other half
    log-spaced ones up to `max_distance` (farther ones share the last bucket). Bidirectional (the encoder) splits the
    buckets by sign, keys after the query in the upper half; causal (the decoder) only sees keys at or before it."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # The log of distances below `exact` is never used (`where`); clamp keeps it finite.
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    far = (exact + scaled.long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores of every block of one stack."""

    def __init__(self, n_head: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.table = nn.Embedding(num_buckets, n_head)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """Bias (1, nh, q_len, k_len) for queries at positions q_offset.. over keys at 0..k_len-1."""
        device = self.table.weight.device
        query = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(key - query, self.bidirectional, self.num_buckets, self.max_distance)
        return self.table(buckets).permute(2, 0, 1).unsqueeze(0)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """(B, nh, Tq, hs) x (B, nh, Tk, hs) -> (B, Tq, nh * hs); unscaled scores plus an additive `bias`."""
    if bias is not None and bias.dtype != q.dtype:
        bias = bias.to(q.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=1.0)
    return y.transpose(1, 2).flatten(2)


class T5SelfAttention(nn.Module):
    """Fused q/k/v projection, optional KV cache (incremental decoding); causality comes with the bias."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_size, self.attn_dropout = cfg.n_head, cfg.head_dim, cfg.attn_dropout
        inner = cfg.n_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.n_embd, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, 3 inner) -> 3 x (B, nh, T, hs)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        y = attend(q, k, v, bias, self.attn_dropout if self.training else 0.0)
        return self.proj(y)


class T5CrossAttention(nn.Module):
    """Decoder queries over the encoder states; their keys and values (`memory`) are computed once per source."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.head_size, self.attn_dropout = cfg.n_head, cfg.head_dim, cfg.attn_dropout
        inner = cfg.n_head * cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, inner, bias=False)
        self.kv = nn.Linear(cfg.n_embd, 2 * inner, bias=False)
        self.proj = nn.Linear(inner, cfg.n_embd, bias=False)

    def memory(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) -> keys and values, each (B, nh, S, hs)."""
        B, S, _ = encoder_states.shape
        k, v = self.kv(encoder_states).view(B, S, 2, self.n_head, self.head_size).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)
        y = attend(q, *memory, mask, self.attn_dropout if self.training else 0.0)
        return self.proj(y)


class T5MLP(nn.Module):
    """act(fc x) -> proj (T5 v1.0, ReLU), or act(fc x) * up x -> proj (v1.1, gated-GELU); dropout inside."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=False)  # Hugging Face: wi (v1.0) or wi_0 (v1.1)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=False) if cfg.gated_mlp else None  # wi_1
        self.act = ACTIVATIONS[cfg.activation]()
        self.dropout = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=False)  # wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        if self.up is not None:
            h = h * self.up(x)
        return self.proj(self.dropout(h))


class T5EncoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = T5SelfAttention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = T5MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop_path(self.dropout(self.attn(self.ln_1(x), bias)))
        return x + self.drop_path(self.dropout(self.mlp(self.ln_2(x))))


class T5DecoderBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = T5SelfAttention(cfg)
        self.ln_cross = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.cross_attn = T5CrossAttention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = T5MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        memory: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.dropout(self.attn(self.ln_1(x), bias, kv_cache)))
        x = x + self.drop_path(self.dropout(self.cross_attn(self.ln_cross(x), memory, memory_mask)))
        return x + self.drop_path(self.dropout(self.mlp(self.ln_2(x))))


def key_padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """(B, S) with 1 = real token -> additive (B, 1, 1, S): 0 on real keys, the dtype's lowest value on padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keep = attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def causal_bias(bias: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """The decoder's position bias (1, nh, Tq, Tk) with keys after their query at the lowest value."""
    Tq, Tk = bias.shape[-2:]
    query = torch.arange(q_offset, q_offset + Tq, device=bias.device)[:, None]
    future = torch.arange(Tk, device=bias.device)[None, :] > query
    return bias.masked_fill(future, torch.finfo(bias.dtype).min)


def init_t5_weights(module: nn.Module, cfg: TransformerConfig) -> None:
    """Mesh TensorFlow's initialisation, as T5 trained with it: N(0, 1) embedding, projections with std
    fan_in ** -0.5, the query's also divided by sqrt(head size) (T5 does not scale its scores), norms at 1."""
    C, hs, ff = cfg.n_embd, cfg.head_dim, cfg.mlp_width
    inner = cfg.n_head * hs
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=C**-0.5 if name.endswith("relative_bias.table") else 1.0)
        elif isinstance(sub, nn.RMSNorm):
            nn.init.ones_(sub.weight)
        elif isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=C**-0.5)
            if name.endswith(("attn.qkv", "cross_attn.q")):
                nn.init.normal_(sub.weight[:inner], std=(C * hs) ** -0.5)
            elif name.endswith(("attn.proj",)):
                nn.init.normal_(sub.weight, std=inner**-0.5)
            elif name.endswith("mlp.proj"):
                nn.init.normal_(sub.weight, std=ff**-0.5)
