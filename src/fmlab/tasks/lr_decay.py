"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning): lower layers move less than the top ones."""

from __future__ import annotations

import re

from torch import nn

from fmlab.tasks.base import NO_DECAY_NAMES

# Parameters before the first block: token/patch/position embeddings, class and mask tokens, the embedding norm.
EMBEDDING_NAMES = ("wte", "wpe", "wtt", "embed", "cls_token", "mask_token", "pos_embed")
BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, n_layer: int) -> int:
    """Embeddings 0, block i -> i + 1, everything after the blocks (final norm, head) -> n_layer + 1."""
    match = BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in EMBEDDING_NAMES):
        return 0
    return n_layer + 1


def layer_decay_groups(
    model: nn.Module, n_layer: int, lr: float, weight_decay: float, decay: float
) -> list[dict]:
    """AdamW groups: one per (layer, decayed or not), lr = base lr * decay ** (n_layer + 1 - layer id)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, n_layer)
        no_decay = p.dim() < 2 or any(part in name for part in NO_DECAY_NAMES)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "layer_id": lid,
            "lr": lr * decay ** (n_layer + 1 - lid),
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
