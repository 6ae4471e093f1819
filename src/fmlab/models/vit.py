"""ViT: a convolutional patch embedding, a CLS token and position embeddings around the transformer core.

The backbone returns hidden states; pooling and heads live in fmlab.models.heads, masking in the MAE task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fmlab.errors import UserError
from fmlab.models.backbone import Backbone
from fmlab.models.pos_embed import interpolate_pos_embed, sincos_2d
from fmlab.models.transformer import Transformer, TransformerConfig, init_weights, num_params, training_flops

POS_EMBEDS = ("learned", "sincos")
# Each size carries the MAE decoder that pre-trains it (light: its own width and depth, dropped after pre-training).
PRESETS = {
    "mini": {"n_layer": 4, "n_head": 4, "n_embd": 64, "patch_size": 4,  # 0.2 M: 28x28 images on a CPU in minutes
             "mae_decoder": {"n_embd": 32, "n_layer": 2, "n_head": 2}},
    "tiny": {"n_layer": 12, "n_head": 3, "n_embd": 192, "patch_size": 16, "img_size": 224,  # ViT-Ti/16, 5.7 M
             "mae_decoder": {"n_embd": 256, "n_layer": 4, "n_head": 8}},
    "small": {"n_layer": 12, "n_head": 6, "n_embd": 384, "patch_size": 16, "img_size": 224,  # ViT-S/16, 22 M
              "mae_decoder": {"n_embd": 256, "n_layer": 4, "n_head": 8}},
    "base": {"n_layer": 12, "n_head": 12, "n_embd": 768, "patch_size": 16, "img_size": 224,  # ViT-B/16, 86 M
             "mae_decoder": {"n_embd": 512, "n_layer": 8, "n_head": 16}},
}


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


@dataclass
class ViTConfig(TransformerConfig):
    presets: ClassVar[dict] = PRESETS
    img_size: int | list[int] | None = None  # side (or [height, width]); None: the data decides
    patch_size: int = 4
    in_chans: int | None = None  # None: the data decides
    pos_embed: str = "learned"  # "learned" (ViT) or "sincos" (fixed 2-D sin-cos, MAE)
    norm_eps: float = 1e-6
    mae_decoder: dict | None = None  # the MAE decoder of this size (None: the size's, see PRESETS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mae_decoder is None:
            self.mae_decoder = dict(PRESETS["mini"]["mae_decoder"])
        if self.pos_embed not in POS_EMBEDS:
            raise UserError(f"model.pos_embed={self.pos_embed!r}; choose one of {POS_EMBEDS}")
        if self.img_size is not None:
            h, w = pair(self.img_size)
            if h % self.patch_size or w % self.patch_size:
                raise UserError(
                    f"model.img_size={self.img_size} is not divisible by model.patch_size={self.patch_size}"
                )

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = pair(self.img_size)
        return h // self.patch_size, w // self.patch_size

    def build(self) -> ViT:
        if self.img_size is None or self.in_chans is None:
            raise UserError("model.img_size and model.in_chans must be set (the image data module sets them)")
        return ViT(self)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided convolution."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.n_embd, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, n_embd)


class ViT(Backbone):
    input_names = ("pixel_values",)
    embedding_names = ("patch_embed", "cls_token", "pos_embed")
    position_tables = ("pos_embed",)  # loading weights of another resolution resizes it (`_resize_pos_embed`)
    sample_unit = "images"

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        table = sincos_2d(config.n_embd, config.grid_size) if config.pos_embed == "sincos" else None
        if table is None:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, config.n_embd))
        else:  # a buffer, so no fine-tuning mode can make it trainable
            self.register_buffer("pos_embed", table)
        self.drop = nn.Dropout(config.dropout)
        self.transformer = Transformer(config)
        init_weights(self, config.n_layer)
        # MAE's init: the patch projection like a linear layer (Xavier), the tokens N(0, 0.02).
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(config.n_embd, -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        if table is None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.register_load_state_dict_pre_hook(self._resize_pos_embed)

    @property
    def num_patches(self) -> int:
        gh, gw = self.config.grid_size
        return gh * gw

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> patch tokens with their position embeddings (B, N, C), no CLS."""
        cfg = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != cfg.in_chans:
            raise ValueError(f"images of shape {tuple(pixel_values.shape)} do not have model.in_chans={cfg.in_chans}")
        if tuple(pixel_values.shape[2:]) != pair(cfg.img_size):
            raise ValueError(f"images are {tuple(pixel_values.shape[2:])} but model.img_size={cfg.img_size}")
        return self.patch_embed(pixel_values) + self.pos_embed[:, 1:]

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, n, C), all or a subset -> hidden states (B, 1 + n, C), CLS first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.transformer(self.drop(torch.cat([cls, tokens], dim=1)))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, in_chans, H, W) -> final hidden states (B, 1 + N, C), CLS first."""
        return self.encode_tokens(self.embed(pixel_values))

    forward = encode

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Images -> the final patch tokens as one map (B, C, H / patch, W / patch) (the CLS token left out)."""
        tokens = self.encode(pixel_values)[:, 1:]
        gh, gw = self.config.grid_size
        return [tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)]

    def feature_channels(self) -> list[int]:
        return [self.config.n_embd]

    def feature_strides(self) -> list[int]:
        return [pair(self.config.patch_size)[0]]

    def no_weight_decay(self) -> set[str]:
        """MAE / timm: the class token and position table; the patch projection decays like any layer."""
        return {n for n, _ in self.named_parameters() if n in ("cls_token", "pos_embed")}

    def sequence_length(self) -> int:
        return self.num_patches + 1

    def flops_per_sample(self) -> int:
        """Training FLOPs of one image: all N patches plus CLS through the encoder (position table excluded)."""
        cfg = self.config
        learned_table = (self.pos_embed,) if isinstance(self.pos_embed, nn.Parameter) else ()
        weights = num_params(self, exclude=learned_table)
        return training_flops(weights, cfg.n_layer, cfg.n_embd, self.num_patches + 1)

    def _resize_pos_embed(self, module, state_dict, prefix, *args) -> None:
        """Loading weights trained at another resolution: interpolate a learned table, rebuild a fixed one."""
        key = prefix + "pos_embed"
        if key not in state_dict or state_dict[key].shape == self.pos_embed.shape:
            return
        if self.config.pos_embed == "sincos":
            state_dict[key] = self.pos_embed.detach().clone()
        else:
            state_dict[key] = interpolate_pos_embed(state_dict[key], self.config.grid_size)
