"""The benchmark's minimal reference models compute fmlab's losses on fmlab's weights (tiny shapes, fp32)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fmlab.models.bert import BertConfig
from fmlab.models.gpt import GPTConfig
from fmlab.tasks.mae import MAETask

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZER = {"_target_": "torch.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "fused": True}


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("reference", ROOT / "benchmarks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reference"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reference", None)


def test_reference_gpt_loss_equals_fmlab(ref) -> None:
    torch.manual_seed(0)
    gpt = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False,
                    activation="gelu").build().eval()
    reference = ref.from_fmlab_gpt(gpt).eval()
    x = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        ours, theirs = gpt(x[:, :-1], x[:, 1:])[1], reference(x[:, :-1], x[:, 1:])
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)
    # The same gradients too: one backward pass through each.
    gpt.zero_grad(), reference.zero_grad()
    gpt(x[:, :-1], x[:, 1:])[1].backward()
    reference(x[:, :-1], x[:, 1:]).backward()
    torch.testing.assert_close(reference.h[1].attn.c_attn.weight.grad, gpt.transformer.blocks[1].attn.qkv.weight.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reference.wte.weight.grad, gpt.wte.weight.grad, rtol=1e-4, atol=1e-6)


def test_reference_gpt_refuses_what_it_does_not_model(ref) -> None:
    gpt = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32).build()  # biases, tanh GELU
    with pytest.raises(ValueError, match="no biases"):
        ref.from_fmlab_gpt(gpt)


def test_reference_bert_mlm_loss_equals_fmlab(ref) -> None:
    torch.manual_seed(0)
    bert = BertConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, pre_norm=False, norm_eps=1e-12,
                      dropout=0.1).build().eval()
    reference = ref.from_fmlab_bert(bert).eval()
    x = torch.randint(0, 97, (3, 16))
    targets = torch.where(torch.rand(3, 16) < 0.3, x, -100)
    targets[0, 0] = x[0, 0]
    with torch.no_grad():
        ours, theirs = bert(x, targets)[1], reference(x, targets)
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)


def test_reference_mae_loss_equals_fmlab(ref) -> None:
    torch.manual_seed(0)
    model = {"_target_": "fmlab.models.vit.ViTConfig", "size": "mini", "img_size": 8, "patch_size": 4, "in_chans": 1,
             "n_layer": 1, "n_head": 2, "n_embd": 16, "pos_embed": "sincos", "activation": "gelu"}
    task = MAETask(model, OPTIMIZER, {"warmup_steps": 1}, decoder={"n_embd": 8, "n_layer": 1, "n_head": 2}).eval()
    reference = ref.from_fmlab_mae(task).eval()
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        ours = task(images, torch.Generator().manual_seed(3))[0]
        theirs = reference(images, torch.Generator().manual_seed(3))
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-5)


def test_reference_optimizer_matches_fmlab_groups_and_schedule(ref) -> None:
    """Decay on the matrices, not embeddings or norms; warm-up then cosine as fmlab's warmup_cosine."""
    from fmlab.tasks.base import param_groups, warmup_cosine

    torch.manual_seed(0)
    gpt = GPTConfig(vocab_size=97, block_size=16, n_layer=1, n_head=2, n_embd=32, bias=False,
                    activation="gelu").build()
    reference = ref.from_fmlab_gpt(gpt)
    opt, sched = ref.reference_optimizer(reference, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, warmup_steps=4,
                                         total_steps=20, min_lr_ratio=0.1)
    ours = param_groups(gpt, 0.1)
    assert [sum(p.numel() for p in g["params"]) for g in opt.param_groups] == \
        [sum(p.numel() for p in g["params"]) for g in ours]
    factor = warmup_cosine(4, 20, 0.1)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * factor(step))
        opt.step()
        sched.step()


@pytest.mark.parametrize("causal", [True, False])
def test_explicit_attention_equals_sdpa(causal: bool) -> None:
    """fmlab's bf16 CPU attention path computes what SDPA computes (checked in fp32, and in bf16 to bf16 rounding)."""
    import torch.nn.functional as F

    from fmlab.models.transformer import explicit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(explicit_attention(q, k, v, causal, 0.0), expected, rtol=1e-5, atol=1e-6)
    half = explicit_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal, 0.0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, rtol=0.05, atol=0.03)


def test_bf16_cpu_forward_takes_the_explicit_path_and_matches_fp32(monkeypatch) -> None:
    from fmlab.models import transformer

    calls = []
    explicit = transformer.explicit_attention
    monkeypatch.setattr(transformer, "explicit_attention", lambda *a: calls.append(a[0].dtype) or explicit(*a))
    torch.manual_seed(0)
    gpt = GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32).build().eval()
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        full = gpt(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = gpt(x)[0]
    assert mixed.dtype == torch.bfloat16 and calls == [torch.bfloat16] * 2  # fp32: SDPA, bf16: both layers explicit
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)
