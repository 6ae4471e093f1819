"""Layer-wise learning-rate decay: embeddings 0, block i -> i + 1, head n_layer + 1, lr = base * decay^(L+1-id)."""

from __future__ import annotations

import pytest

from fmlab.models.backbone import build_backbone
from fmlab.tasks.classification import ClassificationTask

MODEL = {"_target_": "fmlab.models.bert.BertConfig", "vocab_size": 40, "block_size": 8, "n_layer": 3, "n_head": 2,
         "n_embd": 16}
OPT = {"_target_": "torch.optim.AdamW", "lr": 1.0, "weight_decay": 0.1}


VIT = {"_target_": "fmlab.models.vit.ViTConfig", "img_size": 8, "patch_size": 4, "in_chans": 1, "n_layer": 3,
       "n_head": 2, "n_embd": 16}


def test_layer_ids_come_from_the_backbone() -> None:
    bert, vit = build_backbone(MODEL), build_backbone(VIT)
    assert bert.layer_id("wte.weight") == 0 and bert.layer_id("embed_norm.bias") == 0
    assert vit.layer_id("pos_embed") == 0 and vit.layer_id("patch_embed.proj.weight") == 0
    assert vit.layer_id("cls_token") == 0
    assert bert.layer_id("transformer.blocks.0.attn.qkv.weight") == 1
    assert bert.layer_id("transformer.blocks.2.mlp.fc.bias") == 3
    assert bert.layer_id("mlm_head.dense.weight") == 4 and vit.layer_id("transformer.ln_f.weight") == 4
    every = {n: vit.layer_id(n) for n, _ in vit.named_parameters()}
    assert set(every.values()) == {0, 1, 2, 3, 4}, every


def test_weight_decay_exemptions_follow_the_backbone() -> None:
    vit = build_backbone({**VIT, "pos_embed": "learned"})
    assert vit.no_weight_decay() == {"cls_token", "pos_embed"}  # MAE / timm: the patch projection decays
    assert build_backbone(MODEL).no_weight_decay() >= {"wte.weight", "wpe.weight", "wtt.weight"}


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
