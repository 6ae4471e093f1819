"""GPT model: shapes, causality, tied head, init, sampling with the KV cache."""

from __future__ import annotations

import pytest
import torch

from fmlab.models.gpt import GPTConfig
from fmlab.models.transformer import TransformerConfig


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, **kw).build().eval()


def test_forward_shapes_and_loss() -> None:
    model = tiny_gpt()
    x = torch.randint(0, 50, (3, 10))
    logits, loss = model(x, x)
    assert logits.shape == (3, 10, 50)
    assert loss.ndim == 0 and 3.0 < loss.item() < 5.0  # near ln(50) = 3.9 at init


def test_future_tokens_do_not_change_past_logits() -> None:
    model = tiny_gpt()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    assert torch.allclose(model(x)[0][:, :8], model(y)[0][:, :8], atol=1e-6)
    assert not torch.allclose(model(x)[0][:, 8:], model(y)[0][:, 8:])


def test_head_is_tied_and_counted_once() -> None:
    model = tiny_gpt()
    assert model.lm_head.weight is model.wte.weight
    total = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 16 * 16


def test_residual_projections_get_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPTConfig(vocab_size=50, block_size=16, n_layer=8, n_head=2, n_embd=64).build()
    fc_std = model.transformer.blocks[0].mlp.fc.weight.std().item()
    proj_std = model.transformer.blocks[0].mlp.proj.weight.std().item()
    assert fc_std == pytest.approx(0.02, rel=0.1)
    assert proj_std == pytest.approx(0.02 / 4, rel=0.1)  # 1 / sqrt(2 * 8)


def test_greedy_generation_with_cache_matches_full_recompute() -> None:
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (2, 4))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert out.shape == (2, 10)
    assert torch.equal(out[:, :4], prompt)
    ids = prompt
    for _ in range(6):  # no cache: recompute the whole sequence each step
        ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)


def test_sampling_respects_top_k_and_seed() -> None:
    model = tiny_gpt()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, model.generate(prompt, 8, temperature=0))  # top-1 sampling is greedy
    b = model.generate(prompt, 8, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(3))
    c = model.generate(prompt, 8, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b, c)


def test_too_long_inputs_name_block_size() -> None:
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size=16"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=7)


def test_bad_shapes_name_the_option() -> None:
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by model.n_head=4"):
        TransformerConfig(n_embd=30, n_head=4)
