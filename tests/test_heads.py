"""Pooling and the LoRA layer: mask-aware pooling, adapters that start as a no-op and merge exactly."""

from __future__ import annotations

import torch

from fmlab.models.bert import BertConfig
from fmlab.models.heads import ClassificationHead, pool
from fmlab.models.lora import LoRALinear, add_lora, merge_lora


def test_pooling_respects_the_padding_mask() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    assert torch.allclose(pool(hidden, mask, "mean"), torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)]))
    head = ClassificationHead(3, num_labels=5, pooling="mean")
    assert head(hidden, mask).shape == (2, 5)


def test_lora_starts_as_identity_freezes_the_base_and_merges_exactly() -> None:
    torch.manual_seed(0)
    model = BertConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16).build().eval()
    ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        before = model.encode(ids)
    names = add_lora(model, r=4, alpha=8)
    assert len(names) == 8 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert "transformer.blocks.0.attn.qkv.weight" in model.state_dict(), "pretrained names are kept"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    with torch.no_grad():
        assert torch.allclose(model.encode(ids), before)
        for n in names:
            model.get_submodule(n).lora_B.normal_()
        adapted = model.encode(ids)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model.encode(ids), adapted, atol=1e-5)
