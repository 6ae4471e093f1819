"""The transformer core shared by GPT, BERT and ViT: config, attention, MLP, block, stack, init.

Families add their embeddings and heads around `Transformer`; causality, pre/post-LN and drop-path
are config fields, not subclasses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fmlab.errors import UserError, check_choice, check_count, check_rate


@dataclass
class TransformerConfig:
    """Shape and behaviour of the transformer stack (family configs extend it).

    Sizes are registered presets (`presets`, one table per family, as litgpt's `Config.from_name`): `size=<name>`
    fills every field left None from the table, and `from_name(name, **overrides)` builds one in Python.
    """

    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    intermediate_size: int | None = None  # MLP width; None means 4 * n_embd
    dropout: float = 0.0
    attn_dropout: float = 0.0
    bias: bool = True
    causal: bool = False
    pre_norm: bool = True  # False = post-LN, as in the original BERT
    norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu" (exact) or "gelu_tanh" (GPT-2's approximation)
    drop_path: float = 0.0  # stochastic depth rate of the last block, linear from 0
    pooling: str = "cls"  # how a sequence-level head summarises the hidden states: cls, mean or last
    size: str | None = None  # the preset this config started from (None: none)

    def __post_init__(self) -> None:
        if self.size is not None:
            for key, value in preset(type(self), self.size).items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        for name in ("n_layer", "n_head", "n_embd"):
            check_count(f"model.{name}", getattr(self, name))
        for name in ("dropout", "attn_dropout", "drop_path"):
            check_rate(f"model.{name}", getattr(self, name))
        check_choice("model.pooling", self.pooling, POOLING)
        self.check_heads()
        if self.activation not in ACTIVATIONS:
            raise UserError(f"model.activation={self.activation!r}; choose one of {sorted(ACTIVATIONS)}")

    def check_heads(self) -> None:
        """The heads split the width evenly (a family with its own head size, as T5's `head_size`, overrides this)."""
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> TransformerConfig:
        """The preset `name` of this family, with `overrides` on top."""
        return cls(**{**preset(cls, name), "size": name, **overrides})


def preset(config_class: type[TransformerConfig], name: str) -> dict[str, Any]:
    """The fields of preset `name` of a family config class; an unknown name lists the known ones."""
    if name not in config_class.presets:
        raise UserError(f"model.size={name!r}; {config_class.__name__} has {sorted(config_class.presets)}")
    return config_class.presets[name]


POOLING = ("cls", "mean", "last")  # how a sequence-level head summarises the hidden states (fmlab.models.heads)
ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


class KVCache:
    """Pre-allocated keys and values of one attention layer, for incremental decoding."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_size: int, device, dtype) -> None:
        self.k = torch.zeros(batch, n_head, max_len, head_size, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


# Longest sequence `explicit_attention` takes: its (B, nh, T, T) scores are kept for the backward pass.
EXPLICIT_MAX_LEN = 512


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, dropout_p: float
                       ) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + causal mask) v as two batched matmuls: what SDPA computes, for bf16 on CPU, where
    PyTorch's flash-attention backward is 2-8x slower than these matmuls at T <= 512 (experiments/benchmarks)."""
    B, nh, T, hs = q.shape
    q, k, v = (t.reshape(B * nh, T, hs) for t in (q, k, v))
    if is_causal:  # the mask is added by the matmul itself (beta * future + alpha * q k^T)
        future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = torch.baddbmm(future, q, k.transpose(1, 2), alpha=1 / math.sqrt(hs))
    else:
        scores = torch.bmm(q, k.transpose(1, 2)) * (1 / math.sqrt(hs))
    weights = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
    return torch.bmm(weights, v).view(B, nh, T, hs)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.causal, self.attn_dropout = cfg.n_head, cfg.causal, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> 3 x (B, nh, T, hs)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # A cached decode step (T == 1) attends to every cached key, so it needs no causal mask.
        is_causal = self.causal and attn_mask is None and (kv_cache is None or kv_cache.length == 0)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        dropout_p = self.attn_dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and attn_mask is None and kv_cache is None \
                and T <= EXPLICIT_MAX_LEN:
            y = explicit_attention(q, k, v, is_causal and T > 1, dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and T > 1,
                                               dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_width, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]()
        self.proj = nn.Linear(cfg.mlp_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Attention + MLP with residuals; pre-LN (GPT-2, ViT) or post-LN (original BERT)."""

    def __init__(self, cfg: TransformerConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop_path(self.attn(self.ln_1(x), attn_mask, kv_cache))
            return x + self.drop_path(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop_path(self.attn(x, attn_mask, kv_cache)))
        return self.ln_2(x + self.drop_path(self.mlp(x)))


class Transformer(nn.Module):
    """A stack of blocks, with the final LayerNorm that pre-LN models need."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        rates = torch.linspace(0, cfg.drop_path, cfg.n_layer).tolist() if cfg.n_layer > 1 else [cfg.drop_path]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias) if cfg.pre_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, kv_caches[i] if kv_caches is not None else None)
        return self.ln_f(x)


def padding_to_attn_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T) with 1 = real token -> (B, 1, 1, T) boolean mask for SDPA; None passes through."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layer)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            scale = 1 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj", "mlp.proj")) else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def num_params(model: nn.Module, exclude: tuple[nn.Parameter, ...] = ()) -> int:
    """Parameter count, shared (tied) tensors counted once, minus the `exclude` tensors."""
    skip = {id(p) for p in exclude}
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in skip)


def training_flops(
    matmul_params: int, n_layer: int, n_embd: int, seq_len: float, trained_params: int | None = None,
    backward: bool = True,
) -> float:
    """Forward + backward FLOPs of one sequence of `seq_len` tokens (PaLM appendix B; nanoGPT's estimate_mfu).

    Per token: 2 per weight forward, 2 for the input's gradient and 2 for the weight's gradient, so 6 per weight;
    attention scores and weighted values 4 L C T forward and 8 L C T backward, so 12 L C T. A frozen weight
    (`trained_params` counts the others, default all) has no weight gradient; `backward=False` (nothing in the
    stack trains: a linear probe) leaves the forward only.
    """
    trained = matmul_params if trained_params is None else trained_params
    passes = 3 if backward else 1
    weights = 2 * matmul_params + (2 * matmul_params + 2 * trained if backward else 0)
    return (weights + passes * 4 * n_layer * n_embd * seq_len) * seq_len
