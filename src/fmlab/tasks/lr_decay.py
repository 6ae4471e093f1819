"""Layer-wise learning-rate decay (BEiT / MAE fine-tuning): lower layers move less than the top ones.

Which layer a parameter belongs to is the backbone's answer (`Backbone.layer_id`); everything outside the
backbone (the head) is the top layer.
"""

from __future__ import annotations

from torch import nn

from fmlab.models.backbone import Backbone
from fmlab.resolve import MODEL_PREFIX
from fmlab.tasks.base import is_decayed, no_decay_names


def layer_decay_groups(task: nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups: one per (layer, decayed or not), lr = base lr * decay ** (n_layer + 1 - layer id)."""
    backbone: Backbone = task.model
    top = backbone.num_layers + 1
    exempt = no_decay_names(task)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        lid = backbone.layer_id(name.removeprefix(MODEL_PREFIX)) if name.startswith(MODEL_PREFIX) else top
        decayed = is_decayed(name, p, exempt)
        group = groups.setdefault((lid, not decayed), {
            "params": [], "layer_id": lid,
            "lr": lr * decay ** (top - lid),
            "weight_decay": weight_decay if decayed else 0.0,
        })
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]
