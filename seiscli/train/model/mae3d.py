"""A 3D ViT masked autoencoder (facebookresearch/mae adapted to volumes, research notes section 7.2).

Differences from MAE, on purpose:
- the caller passes the visible/masked token ids (see `masking.py`), so a context-parallel rank can run
  the same forward on its slab of the sample and a single process can replay any rank's slab;
- the decoder has no cls token (VideoMAE precedent) and needs no unshuffle: attention does not care about
  order, positions enter only through the added embedding, so the decoder input is simply
  [visible tokens, mask tokens] with the embedding of their true positions;
- position embeddings are computed from ids (`pos_embed.py`), never stored as an (N, D) table;
- the patch embedding is a Conv3d with stride = kernel, applied as the equivalent linear map to the
  visible patches only (masked patches are never embedded);
- the forward returns the SUM of per-patch losses over the masked patches it holds; the caller divides by
  the global masked count of the optimizer step (research notes section 7.5), so any split of the work
  over ranks gives the same loss and gradients.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from seiscli.recipe import RecipeError
from seiscli.train.model.pos_embed import sincos_3d

_BACKENDS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
# On CUDA, "auto" prefers cuDNN: about 1.5x flash attention at head dim 64 on H100 (shared/notes/facts.md).
_AUTO_CUDA = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_context(attention: str, device_type: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A factory of the context that pins the SDPA kernels the recipe asks for."""
    if attention == "auto":
        if device_type != "cuda":
            return contextlib.nullcontext
        return lambda: sdpa_kernel(_AUTO_CUDA, set_priority=True)
    if attention not in _BACKENDS:
        raise RecipeError(f"model.attention={attention!r}; allowed: auto, {', '.join(_BACKENDS)}")
    if device_type != "cuda" and attention in ("cudnn", "efficient"):
        raise RecipeError(f"model.attention={attention!r} needs CUDA; on {device_type} use auto, flash or math")
    return lambda: sdpa_kernel(_BACKENDS[attention])


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, Z, Y, X) -> (B, N, C*p^3) with tokens in C-order over the (z, y, x) grid and each patch's values
    ordered (c, pz, py, px), the flattening order of a Conv3d weight."""
    b, c, z, y, x_ = x.shape
    gz, gy, gx = z // patch, y // patch, x_ // patch
    if (gz * patch, gy * patch, gx * patch) != (z, y, x_):
        raise ValueError(f"volume {tuple(x.shape[2:])} is not divisible by patch size {patch}")
    v = x.reshape(b, c, gz, patch, gy, patch, gx, patch).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return v.reshape(b, gz * gy * gx, c * patch**3)


def gather_tokens(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """t (B, S, K), ids (B, n) -> (B, n, K)."""
    return t.gather(1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sdpa = sdpa
        # Context parallelism: the tokens here are one slab of the sample; the ring attends across slabs.
        self.ring: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.ring is not None:
            o = self.ring(q, k, v)
        else:
            with self.sdpa():
                o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, sdpa: Callable[[], contextlib.AbstractContextManager[None]]
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed3D(nn.Module):
    """Conv3d(in_chans, dim, p, stride=p) applied to already-cut patches as the linear map it is."""

    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)


class MaskedAutoencoder3D(nn.Module):
    def __init__(
        self,
        *,
        grid: tuple[int, int, int],
        patch_size: int = 16,
        in_chans: int = 1,
        encoder_depth: int = 24,
        encoder_dim: int = 1024,
        encoder_heads: int = 16,
        decoder_depth: int = 8,
        decoder_dim: int = 512,
        decoder_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        attention: str = "auto",
        device_type: str = "cpu",
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.activation_checkpointing = activation_checkpointing
        sdpa = sdpa_context(attention, device_type)
        patch_dim = in_chans * patch_size**3

        self.patch_embed = PatchEmbed3D(patch_size, in_chans, encoder_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, encoder_dim))
        self.encoder = nn.ModuleList(Block(encoder_dim, encoder_heads, mlp_ratio, sdpa) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(encoder_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio, sdpa) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """facebookresearch/mae's init: xavier-uniform linears (and the flattened patch conv), N(0, 0.02) tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_context_parallel(self, group: dist.ProcessGroup | None, attention: str = "auto") -> None:
        """Attend across the ranks of `group` (ring attention); each rank's forward then sees one slab."""
        # Imported here: the parallel package imports this module.
        from seiscli.train.parallel.ring_attention import ring_attention

        if attention == "efficient":
            raise RecipeError(
                "model.attention='efficient' has no ring-attention kernel; with cp > 1 use auto, cudnn, flash or math"
            )
        ring = None if group is None else functools.partial(ring_attention, group=group, backend=attention)
        for m in self.modules():
            if isinstance(m, Attention):
                m.ring = ring

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        ac = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if ac else blk(x)
        return x

    def loss_target(self, patches: torch.Tensor) -> torch.Tensor:
        t = patches.to(torch.promote_types(patches.dtype, torch.float32))
        if not self.norm_pix_loss:
            return t
        mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)  # unbiased, as MAE
        return (t - mean) / (var + 1e-6) ** 0.5

    def forward(
        self,
        patches: torch.Tensor,
        keep: torch.Tensor,
        masked: torch.Tensor,
        *,
        offset: int = 0,
        with_cls: bool = True,
    ) -> torch.Tensor:
        """Sum over the masked patches held here of the per-patch mean squared error (fp32 scalar).

        patches: (B, S, C*p^3) the slab's patches (`patchify`); keep (B, v) and masked (B, m): slab-local
        token ids; offset: flat id of the slab's first token; with_cls: this slab carries the cls token.
        """
        b = patches.shape[0]
        h = self.patch_embed(gather_tokens(patches, keep))
        h = h + sincos_3d(keep + offset, self.grid, h.shape[-1]).to(h.dtype)
        if with_cls:
            h = torch.cat([self.cls_token.to(h.dtype).expand(b, -1, -1), h], dim=1)
        else:
            # Context-parallel ranks without the cls token still put it in their graph (with a zero gradient),
            # so every rank's gradient reduction covers the same parameters.
            h = h + 0 * self.cls_token.to(h.dtype)
        h = self.encoder_norm(self._blocks(self.encoder, h))
        if with_cls:
            h = h[:, 1:]

        h = self.decoder_embed(h)
        n_vis = h.shape[1]
        h = torch.cat([h, self.mask_token.to(h.dtype).expand(b, masked.shape[1], -1)], dim=1)
        h = h + sincos_3d(torch.cat([keep, masked], dim=1) + offset, self.grid, h.shape[-1]).to(h.dtype)
        h = self._blocks(self.decoder, h)
        pred = self.decoder_pred(self.decoder_norm(h[:, n_vis:]))

        target = self.loss_target(gather_tokens(patches, masked))
        return ((pred.to(target.dtype) - target) ** 2).mean(-1).sum()
