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

Activation checkpointing: "full" recomputes each block in the backward; "save_attention" (selective, as
torchtitan's op-level SAC) keeps the attention kernels' outputs and recomputes only norms, linears and
GELU, under a tenth of this model's FLOPs at 102,400 tokens. Measured on one H200 (BENCHMARKS.md): peak
memory 49.2 GiB without, 17.4 GiB with save_attention at 2.5 % more step time, 15.4 GiB with full at 28 %.
With ring attention (cp > 1) save_attention falls back to full: the ring is no single op to keep.
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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from seiscli.recipe import RecipeError
from seiscli.train.model.pos_embed import sincos_3d

_BACKENDS = {
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
# On Hopper, "auto" prefers cuDNN: the pretrain model's step is 1.44x faster than with flash on H200 at head dim 64
# (BENCHMARKS.md). Elsewhere flash comes first: cuDNN's attention was not measured there.
_AUTO_HOPPER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_AUTO_OTHER = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# The fused SDPA kernels, by backend name. Selective checkpointing keeps their outputs (the math backend,
# a composite of plain ops, is recomputed).
_KERNELS = {
    torch.ops.aten._scaled_dot_product_cudnn_attention.default: "cudnn",
    torch.ops.aten._scaled_dot_product_flash_attention.default: "flash",
    torch.ops.aten._scaled_dot_product_efficient_attention.default: "efficient",
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: "flash",
}
CHECKPOINTING = ("none", "full", "save_attention")


def _auto_cuda() -> list[SDPBackend]:
    return _AUTO_HOPPER if torch.cuda.get_device_capability()[0] >= 9 else _AUTO_OTHER


def sdpa_context(attention: str, device_type: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A factory of the context that pins the SDPA kernels the recipe asks for."""
    if attention == "auto":
        if device_type != "cuda":
            return contextlib.nullcontext
        order = _auto_cuda()
        return lambda: sdpa_kernel(order, set_priority=True)
    if attention not in _BACKENDS:
        raise RecipeError(f"model.attention={attention!r}; allowed: auto, {', '.join(_BACKENDS)}")
    if device_type != "cuda" and attention in ("cudnn", "efficient"):
        raise RecipeError(f"model.attention={attention!r} needs CUDA; on {device_type} use auto, flash or math")
    return lambda: sdpa_kernel(_BACKENDS[attention])


class _SeenKernels(TorchDispatchMode):
    """Records which fused SDPA kernels the dispatcher runs (below autograd, after SDPA's own choice)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        if func in _KERNELS:
            self.seen.append(_KERNELS[func])
        return func(*args, **(kwargs or {}))  # type: ignore[operator]


def resolve_attention(attention: str, device: torch.device, head_dims: tuple[int, ...]) -> str:
    """The SDPA kernel that `attention` runs on `device` for bf16 heads of these sizes: "cudnn", "flash",
    "efficient" or "math" ("a+b" when the head sizes get different kernels). Found by running SDPA once on
    a small input of the model's layout under the same context and watching which aten kernel it picks."""
    ctx = sdpa_context(attention, device.type)
    names: list[str] = []
    for hd in head_dims:
        qkv = torch.randn(1, 128, 3, 2, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        with ctx(), _SeenKernels() as mode:
            F.scaled_dot_product_attention(q, k, v)
        name = mode.seen[0] if mode.seen else "math"  # the math backend is a composite of plain matmuls
        if name not in names:
            names.append(name)
    return "+".join(names)


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
            o = _eager(self.ring, q, k, v)
        else:
            with self.sdpa():
                o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, s, d))


@torch.compiler.disable
def _eager(ring: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Ring attention stays out of compiled graphs (its point-to-point exchange is not traceable)."""
    return ring(q, k, v)


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
        activation_checkpointing: bool | str = False,
    ) -> None:
        """activation_checkpointing: False/"none", True/"full" or "save_attention" (module docstring)."""
        super().__init__()
        self.grid = tuple(grid)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        ac = activation_checkpointing
        ac = ("full" if ac else "none") if isinstance(ac, bool) else ac
        if ac not in CHECKPOINTING:
            raise RecipeError(f"activation checkpointing {ac!r}; allowed: {', '.join(CHECKPOINTING)}")
        self.activation_checkpointing: str = ac
        self.attention = attention
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
        from seiscli.train.parallel.ring_attention import default_block_backend, ring_attention

        if attention == "efficient":
            raise RecipeError(
                "model.attention='efficient' has no ring-attention kernel; with cp > 1 use auto, cudnn, flash or math"
            )
        if group is not None:
            try:  # a kernel this device lacks fails here, not at the first forward
                default_block_backend(self.cls_token.device, attention)
            except ValueError as e:
                raise RecipeError(str(e)) from None
        ring = None if group is None else functools.partial(ring_attention, group=group, backend=attention)
        for m in self.modules():
            if isinstance(m, Attention):
                m.ring = ring

    def attention_kernel(self, device: torch.device) -> str:
        """The attention kernel this model's forward runs on `device`, for the trainer's log."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        if any(m.ring is not None for m in layers):
            from seiscli.train.parallel.ring_attention import default_block_backend

            return "ring/" + default_block_backend(device, self.attention)
        head_dims = tuple(dict.fromkeys(m.proj.in_features // m.heads for m in layers))
        return resolve_attention(self.attention, device, head_dims)

    def _checkpointing(self) -> dict[str, object] | None:
        """checkpoint() arguments for this forward, or None to keep every activation."""
        if self.activation_checkpointing == "none" or not (self.training and torch.is_grad_enabled()):
            return None
        # A ring's outputs are not single ops that selective checkpointing could keep: recompute it whole.
        ring = any(m.ring is not None for m in self.modules() if isinstance(m, Attention))
        if self.activation_checkpointing == "save_attention" and not ring:
            return {"use_reentrant": False, "context_fn": _save_attention}
        return {"use_reentrant": False}

    def _blocks(self, blocks: nn.ModuleList, x: torch.Tensor, ac: dict[str, object] | None) -> torch.Tensor:
        for blk in blocks:
            x = checkpoint(blk, x, **ac) if ac is not None else blk(x)
        return x

    def _masked_loss(self, h: torch.Tensor, patches: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        pred = self.decoder_pred(self.decoder_norm(h))
        target = self.loss_target(gather_tokens(patches, masked))
        return ((pred.to(target.dtype) - target) ** 2).mean(-1).sum()

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
        ac = self._checkpointing()
        h = self._decode(self._encode(patches, keep, offset, with_cls, ac), keep, masked, offset, ac)
        if ac is None:
            return self._masked_loss(h, patches, masked)
        # Checkpointed, the fp32 targets and differences (4 x 4 KiB per masked token) are not kept.
        return checkpoint(self._masked_loss, h, patches, masked, use_reentrant=False)

    def _encode(
        self, patches: torch.Tensor, keep: torch.Tensor, offset: int, with_cls: bool, ac: dict[str, object] | None
    ) -> torch.Tensor:
        """Encoder output of the visible tokens `keep` (B, v, D), the cls token dropped."""
        b = patches.shape[0]
        h = self.patch_embed(gather_tokens(patches, keep))
        h = h + sincos_3d(keep + offset, self.grid, h.shape[-1]).to(h.dtype)
        if with_cls:
            h = torch.cat([self.cls_token.to(h.dtype).expand(b, -1, -1), h], dim=1)
        else:
            # Context-parallel ranks without the cls token still put it in their graph (with a zero gradient),
            # so every rank's gradient reduction covers the same parameters.
            h = h + 0 * self.cls_token.to(h.dtype)
        h = self.encoder_norm(self._blocks(self.encoder, h, ac))
        return h[:, 1:] if with_cls else h

    def _decode(
        self, h: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor, offset: int, ac: dict[str, object] | None
    ) -> torch.Tensor:
        """Decoder states of the masked tokens (B, m, decoder_dim), before the decoder norm."""
        h = self.decoder_embed(h)
        n_vis = h.shape[1]
        h = torch.cat([h, self.mask_token.to(h.dtype).expand(h.shape[0], masked.shape[1], -1)], dim=1)
        h = h + sincos_3d(torch.cat([keep, masked], dim=1) + offset, self.grid, h.shape[-1]).to(h.dtype)
        return self._blocks(self.decoder, h, ac)[:, n_vis:]

    def predict(self, patches: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The prediction of each masked patch (B, m, C*p^3), in the loss target's space (per-patch normalised
        under norm_pix_loss); one process, whole crops (evaluation)."""
        h = self._decode(self._encode(patches, keep, 0, True, None), keep, masked, 0, None)
        return self.decoder_pred(self.decoder_norm(h))

    def features(self, patches: torch.Tensor) -> torch.Tensor:
        """Encoder output of every token of whole crops, nothing masked: (B, N, D) in token order."""
        ids = torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[0], -1)
        return self._encode(patches, ids, 0, True, None)


def _save_attention() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
    return create_selective_checkpoint_contexts(list(_KERNELS))
