"""Fixed factorised 3D sin-cos position embedding, computed from token ids.

The channels are split into three even parts, one per axis (z, y, x), each a 1D sin-cos table as in
facebookresearch/mae's `get_1d_sincos_pos_embed_from_grid`; a token's embedding is the concatenation of the
rows for its z, y and x index. Only the per-axis tables (grid side x channels) are built, never an (N, D)
table: at 1.2M tokens and D = 1024 that would be 4.8 GB.
"""

from __future__ import annotations

import torch


def axis_dims(dim: int) -> tuple[int, int, int]:
    """Even channel counts for (z, y, x) summing to dim, as equal as possible (1024 -> 342, 342, 340)."""
    if dim % 2 or dim < 6:
        raise ValueError(f"embedding dim {dim} must be even and >= 6 for a 3D sin-cos embedding")
    pairs, rem = divmod(dim // 2, 3)
    return tuple(2 * (pairs + (i < rem)) for i in range(3))  # type: ignore[return-value]


def sincos_1d(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(length, dim) table: sin of position x omega in the first half, cos in the second (MAE layout)."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=device) / half)
    angle = torch.arange(length, dtype=torch.float64, device=device)[:, None] * omega[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def split_ids(ids: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat C-order token ids -> (z, y, x) grid indices."""
    _, gy, gx = grid
    return ids // (gy * gx), (ids // gx) % gy, ids % gx


def sincos_3d(ids: torch.Tensor, grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Embedding of the tokens with flat ids `ids` (any shape) -> ids.shape + (dim,), float32."""
    tables = [sincos_1d(g, d, ids.device) for g, d in zip(grid, axis_dims(dim), strict=True)]
    return torch.cat([t[i] for t, i in zip(tables, split_ids(ids, grid), strict=True)], dim=-1)
