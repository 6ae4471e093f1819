"""Position embeddings for image patches: fixed 2-D sin-cos tables and resizing a table to another grid."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fmlab.errors import UserError


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): half sines, half cosines at geometric frequencies (as in MAE)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Fixed table (1, num_prefix + gh * gw, dim): half the channels encode the row, half the column.

    Prefix tokens (CLS) get zeros, as in MAE.
    """
    if dim % 4:
        raise UserError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())], dim=1)
    return torch.cat([torch.zeros(num_prefix, dim), table])[None]


def interpolate_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1, old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize a learned table (1, prefix + N, C) to `new_grid` with bicubic interpolation; prefix rows kept.

    `old_grid` defaults to the square grid of N patches.
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n, dim = patches.shape[1], patches.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"cannot infer the patch grid of a {n}-patch position table; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    # (1, N, C) -> (1, C, gh, gw) -> resize -> (1, N', C)
    grid = patches.reshape(1, *old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)
