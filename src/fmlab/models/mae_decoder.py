"""The MAE decoder (He et al. 2021) beside the ViT it pre-trains, and the pixel layout of patches.

The decoder fills mask tokens in at the masked positions, adds fixed sin-cos positions, runs a small transformer of
its own width and depth, and predicts every patch's pixels; it is thrown away after pre-training. Which patches are
masked, and the loss, belong to the objective (fmlab/tasks/mae.py).
"""

from __future__ import annotations

import torch
from torch import nn

from fmlab.models.pos_embed import sincos_2d
from fmlab.models.transformer import Transformer, TransformerConfig, init_weights


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C), patches in row-major order like the patch embedding."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, p: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, p * p * C) -> (B, C, H, W)."""
    B, (gh, gw) = patches.shape[0], grid
    x = patches.reshape(B, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, gh * p, gw * p)


class MAEDecoder(nn.Module):
    """Mask tokens + fixed sin-cos positions + a small transformer -> pixels of every patch."""

    def __init__(self, encoder: nn.Module, n_embd: int = 128, n_layer: int = 2, n_head: int = 4) -> None:
        super().__init__()
        enc = encoder.config
        cfg = TransformerConfig(
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, norm_eps=enc.norm_eps, activation=enc.activation
        )
        self.proj_in = nn.Linear(enc.n_embd, n_embd)  # a name without "embed": weight-decayed like a layer
        self.mask_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.register_buffer("pos_embed", sincos_2d(n_embd, enc.grid_size), persistent=False)
        self.transformer = Transformer(cfg)
        self.pred = nn.Linear(n_embd, enc.patch_size**2 * enc.in_chans)
        init_weights(self, n_layer)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder states (B, 1 + n_keep, C_enc) -> pixel predictions (B, N, p * p * in_chans)."""
        x = self.proj_in(latent)
        B, N, D = x.shape[0], ids_restore.shape[1], x.shape[2]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(B, N - (x.shape[1] - 1), -1).to(x.dtype)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, D))  # back to image order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        return self.pred(self.transformer(x)[:, 1:])

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}
