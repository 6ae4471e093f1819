"""Layer-wise learning-rate decay: embeddings 0, block i -> i + 1, head n_layer + 1, lr = base * decay^(L+1-id)."""

from __future__ import annotations

import pytest

from fmlab.tasks.classification import ClassificationTask
from fmlab.tasks.lr_decay import layer_id

MODEL = {"_target_": "fmlab.models.bert.BertConfig", "vocab_size": 40, "block_size": 8, "n_layer": 3, "n_head": 2,
         "n_embd": 16}
OPT = {"_target_": "torch.optim.AdamW", "lr": 1.0, "weight_decay": 0.1}


def test_layer_ids() -> None:
    assert layer_id("model.wte.weight", 3) == 0
    assert layer_id("model.embed_norm.bias", 3) == 0
    assert layer_id("model.pos_embed", 3) == 0 and layer_id("model.patch_embed.proj.weight", 3) == 0
    assert layer_id("model.transformer.blocks.0.attn.qkv.weight", 3) == 1
    assert layer_id("model.transformer.blocks.2.mlp.fc.bias", 3) == 3
    assert layer_id("model.transformer.ln_f.weight", 3) == 4
    assert layer_id("head.classifier.weight", 3) == 4


def test_groups_get_the_decayed_learning_rates() -> None:
    task = ClassificationTask(MODEL, OPT, {}, num_labels=4, layer_decay=0.5)
    groups = task.parameter_groups()
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(task.named_parameters())
    assert lr_of[id(named["head.classifier.weight"])] == (1.0, 0.1)
    assert lr_of[id(named["head.classifier.bias"])] == (1.0, 0.0)
    assert lr_of[id(named["model.transformer.blocks.2.attn.qkv.weight"])][0] == 0.5
    assert lr_of[id(named["model.transformer.blocks.0.attn.qkv.weight"])][0] == 0.125
    assert lr_of[id(named["model.wte.weight"])] == (0.0625, 0.0)
    assert len(lr_of) == len([p for p in task.parameters() if p.requires_grad]), "every parameter in one group"


def test_layer_decay_must_be_a_factor() -> None:
    with pytest.raises(ValueError, match="layer_decay"):
        ClassificationTask(MODEL, OPT, {}, num_labels=2, layer_decay=1.5)
