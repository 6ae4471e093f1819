"""LoRA: low-rank adapters on the linear layers of any of our models, mergeable into plain weights for export.

Our own small layer rather than `peft`: peft wraps each target (`qkv` -> `qkv.base_layer`), which renames the
pretrained weights and breaks loading a backbone by name; `LoRALinear` is an `nn.Linear`, so names stay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmlab.errors import UserError

LORA_PARAMS = ("lora_A", "lora_B")
# The attention and MLP projections of fmlab.models.transformer.Block.
DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T; W and b frozen, B starts at zero (no change at step 0)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, **kw) -> None:
        super().__init__(in_features, out_features, **kw)
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return super().forward(x) + self.scaling * delta

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + (alpha / r) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear = linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def add_lora(
    model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: tuple[str, ...] = DEFAULT_TARGETS
) -> list[str]:
    """Swap every nn.Linear whose name ends with one of `targets` for a LoRALinear sharing its weight and bias;
    freezes everything else in `model`. Returns the adapted module names."""
    if r < 1:
        raise UserError(f"lora.r={r} must be at least 1")
    names = [
        n for n, m in model.named_modules() if type(m) is nn.Linear and n.endswith(tuple(targets))
    ]
    if not names:
        raise UserError(f"lora.targets={list(targets)} match no linear layer of {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        old = model.get_submodule(name)
        new = LoRALinear(old.in_features, old.out_features, r, alpha, dropout, bias=old.bias is not None)
        new = new.to(device=old.weight.device)
        new.weight, new.bias = old.weight, old.bias  # the same Parameter objects: loading still fills them
        new.weight.requires_grad_(False)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        _replace(model, name, new)
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain nn.Linear, in place: the state dict then has the original names."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    return model
