"""ViT backbone: shapes, input checks, fixed and learned position embeddings, resizing a table on load."""

from __future__ import annotations

import pytest
import torch

from fmlab.models.pos_embed import interpolate_pos_embed, sincos_2d
from fmlab.models.vit import ViTConfig


def tiny(img_size=28, pos_embed="learned", **kw) -> ViTConfig:
    return ViTConfig(img_size=img_size, in_chans=1, patch_size=4, n_layer=2, n_head=2, n_embd=32,
                     pos_embed=pos_embed, **kw)


def test_encode_shape_cls_first_and_any_image_shape() -> None:
    model = tiny().build()
    assert model.encode(torch.randn(3, 1, 28, 28)).shape == (3, 1 + 49, 32)
    rgb = ViTConfig(img_size=[16, 24], in_chans=3, patch_size=8, n_layer=1, n_head=2, n_embd=16).build()
    assert rgb.encode(torch.randn(2, 3, 16, 24)).shape == (2, 1 + 2 * 3, 16)


def test_wrong_input_is_an_error_naming_the_config() -> None:
    model = tiny().build()
    with pytest.raises(ValueError, match="model.in_chans=1"):
        model.encode(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="model.img_size=28"):
        model.encode(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by model.patch_size"):
        tiny(img_size=30)


def test_sincos_table_is_fixed_and_not_trained() -> None:
    table = sincos_2d(32, (7, 7))
    assert table.shape == (1, 50, 32)
    assert torch.all(table[0, 0] == 0)  # the CLS position
    model = tiny(pos_embed="sincos").build()
    assert "pos_embed" in dict(model.named_buffers())
    assert not any("pos_embed" in n for n, _ in model.named_parameters())
    assert torch.equal(model.pos_embed, table)


def test_learned_table_interpolates_when_loading_at_another_resolution() -> None:
    small = tiny(img_size=28).build()
    big = tiny(img_size=32).build()
    big.load_state_dict(small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])  # CLS row kept
    assert torch.equal(big.transformer.blocks[0].attn.qkv.weight, small.transformer.blocks[0].attn.qkv.weight)
    assert big.encode(torch.randn(2, 1, 32, 32)).shape == (2, 65, 32)
    # The same grid is left alone; a sin-cos table is rebuilt for the new grid instead of interpolated.
    assert interpolate_pos_embed(small.pos_embed, (7, 7)) is small.pos_embed
    fixed = tiny(img_size=32, pos_embed="sincos").build()
    fixed.load_state_dict(tiny(img_size=28, pos_embed="sincos").build().state_dict())
    assert torch.equal(fixed.pos_embed, sincos_2d(32, (8, 8)))


def test_drop_path_rates_grow_with_depth() -> None:
    model = tiny(drop_path=0.2).build()
    assert [b.drop_path.p for b in model.transformer.blocks] == pytest.approx([0.0, 0.2])
