"""The 3D MAE: position embedding, patch embedding, forward/loss against MAE's own (unshuffle) formulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from seiscli.recipe import RecipeError
from seiscli.train.model import MaskedAutoencoder3D, batch_masks, patchify, plan_lengths
from seiscli.train.model.mae3d import _SeenKernels, resolve_attention, sdpa_context
from seiscli.train.model.pos_embed import axis_dims, sincos_3d

GRID = (2, 3, 4)
N = 24
P = 4


def tiny(**kw: object) -> MaskedAutoencoder3D:
    torch.manual_seed(0)
    args: dict = dict(grid=GRID, patch_size=P, encoder_depth=2, encoder_dim=24, encoder_heads=2)
    args.update(decoder_depth=2, decoder_dim=12, decoder_heads=2, norm_pix_loss=True)
    args.update(kw)
    return MaskedAutoencoder3D(**args)


def volume(b: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 1, GRID[0] * P, GRID[1] * P, GRID[2] * P, generator=g, dtype=dtype)


def masks(b: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_masks(plan_lengths(N, 0.75, 1), 1, 2, list(range(b)))


# -- position embedding ------------------------------------------------------------------------------


def test_axis_dims_are_even_and_sum_to_dim() -> None:
    assert axis_dims(1024) == (342, 342, 340)
    assert axis_dims(96) == (32, 32, 32)
    for d in range(6, 300, 2):
        dims = axis_dims(d)
        assert sum(dims) == d and all(x % 2 == 0 and x > 0 for x in dims) and max(dims) - min(dims) <= 2
    with pytest.raises(ValueError):
        axis_dims(25)


def _mae_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py: get_1d_sincos_pos_embed_from_grid."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def test_sincos_3d_is_the_concatenation_of_mae_1d_tables() -> None:
    dim = 40
    z, y, x = np.meshgrid(*(np.arange(g) for g in GRID), indexing="ij")
    dz, dy, dx = axis_dims(dim)
    want = np.concatenate([_mae_1d(dz, z), _mae_1d(dy, y), _mae_1d(dx, x)], axis=1)
    got = sincos_3d(torch.arange(N), GRID, dim)
    assert got.dtype == torch.float32 and got.shape == (N, dim)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_sincos_3d_takes_any_id_shape_and_gives_distinct_rows() -> None:
    ids = torch.tensor([[5, 0], [23, 5]])
    e = sincos_3d(ids, GRID, 12)
    assert e.shape == (2, 2, 12) and torch.equal(e[0, 0], e[1, 1])
    full = sincos_3d(torch.arange(N), GRID, 12)
    assert torch.cdist(full, full).add(torch.eye(N)).min() > 1e-3


def test_the_model_stores_no_per_token_table() -> None:
    m = tiny(grid=(5, 6, 7))  # 210 tokens
    assert list(m.buffers()) == []
    assert not any({210, 211} & set(p.shape) for p in m.parameters())


# -- patches -------------------------------------------------------------------------------------------


def test_patch_embedding_equals_the_strided_conv() -> None:
    m, x = tiny(), volume()
    want = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(m.patch_embed(patchify(x, P)), want, rtol=1e-5, atol=1e-6)


def test_patchify_orders_tokens_z_y_x() -> None:
    x = volume(1)
    p = patchify(x, P)
    z, y, xx = 1, 2, 3
    assert torch.equal(
        p[0, z * 12 + y * 4 + xx], x[0, 0, z * P : (z + 1) * P, y * P : (y + 1) * P, xx * P : (xx + 1) * P].flatten()
    )
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 1, 5, 8, 8), P)


# -- forward and loss ---------------------------------------------------------------------------------


def mae_reference(
    m: MaskedAutoencoder3D, x: torch.Tensor, keep: torch.Tensor, masked: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """facebookresearch/mae's forward: embed every patch, gather the visible ones, unshuffle the decoder input
    with ids_restore, predict every token, weight the per-patch loss with the binary mask."""
    b, d_e, d_d = x.shape[0], m.cls_token.shape[-1], m.mask_token.shape[-1]
    tokens = m.patch_embed.proj(x).flatten(2).transpose(1, 2) + sincos_3d(torch.arange(N), GRID, d_e).to(x.dtype)
    h = torch.cat([m.cls_token.expand(b, -1, -1), tokens.gather(1, keep[..., None].expand(-1, -1, d_e))], dim=1)
    for blk in m.encoder:
        h = blk(h)
    h = m.decoder_embed(m.encoder_norm(h))[:, 1:]
    ids_restore = torch.cat([keep, masked], dim=1).argsort(dim=1)
    h = torch.cat([h, m.mask_token.expand(b, masked.shape[1], -1)], dim=1)
    h = h.gather(1, ids_restore[..., None].expand(-1, -1, d_d)) + sincos_3d(torch.arange(N), GRID, d_d).to(x.dtype)
    for blk in m.decoder:
        h = blk(h)
    pred = m.decoder_pred(m.decoder_norm(h))
    t = target
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(b, N, dtype=x.dtype).scatter_(1, masked, 1.0)
    return (((pred - t) ** 2).mean(-1) * mask).sum()


def test_forward_equals_mae_unshuffle_formulation_and_ignores_visible_targets() -> None:
    m, x = tiny().double(), volume(dtype=torch.float64)
    keep, masked = masks()
    patches = patchify(x, P)
    ours = m(patches, keep, masked)
    assert ours.shape == () and ours.dtype == torch.float64
    torch.testing.assert_close(ours, mae_reference(m, x, keep, masked, patches), rtol=1e-12, atol=0)
    # Garbage in the targets of visible patches must not change the loss: it is on masked patches only.
    spoiled = patches.clone()
    spoiled.scatter_(1, keep[..., None].expand(-1, -1, patches.shape[-1]), 1e3)
    torch.testing.assert_close(mae_reference(m, x, keep, masked, spoiled), ours, rtol=1e-12, atol=0)


def test_loss_is_a_sum_over_masked_patches() -> None:
    m, x = tiny(norm_pix_loss=False), volume()
    keep, masked = masks()
    patches = patchify(x, P)
    preds: list[torch.Tensor] = []
    m.decoder_pred.register_forward_hook(lambda mod, inp, out: preds.append(out))
    loss = m(patches, keep, masked)
    (pred,) = preds
    assert pred.shape == (3, masked.shape[1], P**3)  # predictions are made for masked tokens only
    target = patches.gather(1, masked[..., None].expand(-1, -1, P**3))
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(-1).sum())


def test_norm_pix_target_is_normalised_per_patch() -> None:
    t = tiny().loss_target(patchify(volume() * 5 + 3, P))
    torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(t.shape[:2]), atol=1e-3, rtol=0)


def test_every_parameter_gets_a_gradient() -> None:
    m = tiny()
    m(patchify(volume(), P), *masks()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []  # DDP runs with find_unused_parameters=False


@pytest.mark.parametrize("mode", [True, "full", "save_attention"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(mode: bool | str) -> None:
    grads = []
    for ac in (False, mode):
        m = tiny(activation_checkpointing=ac)
        loss = m(patchify(volume(), P), *masks())
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_save_attention_recomputes_everything_but_the_attention_kernel() -> None:
    """Fused attention calls in forward + backward: one per block without recompute or with save_attention,
    two with full recompute; every other op is recomputed by both checkpointing modes."""
    counts = {}
    for ac in ("none", "full", "save_attention"):
        m = tiny(activation_checkpointing=ac)
        with _SeenKernels() as seen:
            loss = m(patchify(volume(), P), *masks())
            loss.backward()
        counts[ac] = len(seen.seen)
    assert counts == {"none": 4, "full": 8, "save_attention": 4}


def test_checkpointing_mode_is_checked() -> None:
    with pytest.raises(RecipeError, match="save_attention"):
        tiny(activation_checkpointing="selective")


def test_resolve_attention_names_the_kernel_sdpa_runs() -> None:
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, (12, 6)) == "flash"  # torch's CPU SDPA is a flash kernel
    assert resolve_attention("math", cpu, (64,)) == "math"
    assert tiny().attention_kernel(cpu) == "flash"
    assert tiny(attention="math").attention_kernel(cpu) == "math"


def test_slab_offset_and_cls_flag_select_positions() -> None:
    """A slab with offset o sees the same positions as the whole sample at ids + o."""
    m, x = tiny(), volume(1)
    patches = patchify(x, P)
    keep, masked = torch.tensor([[1, 3, 5]]), torch.tensor([[0, 2, 4, 6, 7]])
    whole = m(patches, keep + 8, masked + 8, with_cls=False)
    slab = m(patches[:, 8:16], keep, masked, offset=8, with_cls=False)
    torch.testing.assert_close(whole, slab)
    assert not torch.allclose(slab, m(patches[:, 8:16], keep, masked, offset=0, with_cls=False))


def test_bf16_autocast_stays_close_to_fp32() -> None:
    m, x = tiny(), volume()
    keep, masked = masks()
    ref = m(patchify(x, P), keep, masked)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(patchify(x, P), keep, masked)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=3e-2, atol=0)


def test_xavier_init_as_mae() -> None:
    m = tiny()
    w = m.decoder_pred.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all(torch.equal(mod.bias, torch.zeros_like(mod.bias)) for mod in m.modules() if isinstance(mod, nn.Linear))
    assert 0.005 < m.mask_token.std() < 0.05


@pytest.mark.parametrize("attention", ["math", "flash", "auto"])
def test_cpu_attention_backends_agree(attention: str) -> None:
    m, x = tiny(attention="math"), volume()
    ref = m(patchify(x, P), *masks())
    other = tiny(attention=attention)
    torch.testing.assert_close(other(patchify(x, P), *masks()), ref, rtol=1e-5, atol=1e-5)


def test_gpu_only_attention_is_refused_on_cpu() -> None:
    with pytest.raises(RecipeError, match=r"model\.attention='cudnn' needs CUDA"):
        sdpa_context("cudnn", "cpu")
