"""Ring attention against full attention in one process: outputs and all three gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from seiscli.train.parallel import ring_attention as ra
from tests.distributed import run_distributed


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _check_ring(
    rank: int, ws: int, s_local: int, heads: int, dim: int, dtype: torch.dtype, backend: str, scale: float | None
) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, heads, ws * s_local, dim, generator=g, dtype=torch.float64) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*ref, scale=scale)
    ref_out.backward(dout)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return t.detach().chunk(ws, dim=2)[rank]

    loc = [shard(t).to(dtype).requires_grad_() for t in (q, k, v)]
    out = ra.ring_attention(*loc, dist.group.WORLD, scale=scale, backend=backend)
    out.backward(shard(dout).to(dtype))
    errs = {"out": rel_err(out, shard(ref_out))}
    for name, a, b in zip(("dq", "dk", "dv"), loc, ref, strict=True):
        errs[name] = rel_err(a.grad, shard(b.grad))
    # Every rank must be right, not just rank 0.
    worst = torch.tensor(max(errs.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    errs["worst_rank"] = worst.item()
    return errs


@pytest.mark.parametrize(
    ("ws", "s_local", "heads", "dim", "dtype", "backend", "scale"),
    [
        (2, 7, 2, 16, torch.float64, "math", None),
        (3, 5, 3, 32, torch.float64, "cpu_flash", None),  # 3 ranks catch ring-index mistakes
        (4, 1, 1, 8, torch.float32, "cpu_flash", 0.3),
        (2, 64, 2, 64, torch.float32, "cpu_flash", None),
        (2, 33, 2, 64, torch.bfloat16, "cpu_flash", None),
    ],
)
def test_ring_matches_full_attention(
    ws: int, s_local: int, heads: int, dim: int, dtype: torch.dtype, backend: str, scale: float | None
) -> None:
    errs = run_distributed(_check_ring, ws, s_local, heads, dim, dtype, backend, scale)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    assert errs["worst_rank"] < tol, errs


def test_single_rank_is_plain_sdpa() -> None:
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    assert torch.equal(ra.ring_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


def _count_messages(rank: int, ws: int) -> tuple[int, int]:
    sent: list[int] = []
    real = ra._Ring.start

    def counting(self: ra._Ring, send: torch.Tensor) -> torch.Tensor:
        sent.append(send.numel())
        return real(self, send)

    ra._Ring.start = counting  # type: ignore[method-assign]
    q, k, v = (torch.randn(1, 1, 4, 8, requires_grad=True) for _ in range(3))
    out = ra.ring_attention(q, k, v, dist.group.WORLD)
    fwd = len(sent)
    out.sum().backward()
    return fwd, len(sent) - fwd


def test_message_count() -> None:
    # Forward: cp-1 K/V exchanges. Backward: cp-1 K/V plus cp dK/dV exchanges. Nothing else travels.
    assert run_distributed(_count_messages, 3) == (2, 5)


def test_unknown_backend_named() -> None:
    with pytest.raises(ValueError, match="allowed: math, cpu_flash, flash, cudnn"):
        ra.default_block_backend(torch.device("cpu"), "triton")


# -- guards (issue 11, item 4) ------------------------------------------------------------------------------


def _unequal_lengths(rank: int, ws: int) -> list[str]:
    """Rank r holds 5 + r tokens; every rank must get the same clear error (unchecked, gloo aborts in C++)."""
    q, k, v = (torch.randn(1, 2, 5 + rank, 8) for _ in range(3))
    with pytest.raises(ra.RingShapeError) as err:
        ra.ring_attention(q, k, v, dist.group.WORLD)
    # A later, well-formed call still works: the failed check left nothing half-done.
    same = [torch.randn(1, 2, 4, 8) for _ in range(3)]
    assert ra.ring_attention(*same, dist.group.WORLD).shape == (1, 2, 4, 8)
    msgs = [None] * ws
    dist.all_gather_object(msgs, str(err.value))
    return msgs


def test_unequal_local_lengths_are_a_clear_error_on_every_rank() -> None:
    msgs = run_distributed(_unequal_lengths, 2)
    assert len(set(msgs)) == 1, msgs
    assert "rank 0: q (1, 2, 5, 8) k (1, 2, 5, 8); rank 1: q (1, 2, 6, 8) k (1, 2, 6, 8)" in msgs[0]
    assert "same number of tokens" in msgs[0]


def _math_under_autocast(rank: int, ws: int) -> float:
    """The math kernel in fp32 under the trainer's bf16 autocast, against fp64 full attention."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 2, ws * 16, 32, generator=g, dtype=torch.float64) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*ref)
    ref_out.backward(dout)
    loc = [t.chunk(ws, dim=2)[rank].float().requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ra.ring_attention(*loc, dist.group.WORLD, backend="math")
    out.backward(dout.chunk(ws, dim=2)[rank].float())
    errs = [rel_err(out, ref_out.chunk(ws, dim=2)[rank])]
    errs += [rel_err(a.grad, b.grad.chunk(ws, dim=2)[rank]) for a, b in zip(loc, ref, strict=True)]
    worst = torch.tensor(max(errs), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def test_math_kernel_stays_fp32_under_bf16_autocast() -> None:
    # Under autocast its matmuls ran in bf16: ~1e-2 off. fp32 everywhere: ~1e-6.
    assert run_distributed(_math_under_autocast, 2) < 2e-5


def test_flash_ring_kernel_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model.attention='flash' with parallelism.cp > 1 needs CUDA.*auto or math"):
        ra.default_block_backend(torch.device("cpu"), "flash")
    assert ra.default_block_backend(torch.device("cpu"), "math") == "math"


def test_flash_with_cp_on_cpu_is_refused_by_the_recipe() -> None:
    from seiscli.recipe import RecipeError, load_recipe

    for kernel in ("flash", "cudnn"):
        with pytest.raises(
            RecipeError, match=rf"model.attention='{kernel}' with parallelism.cp=2 on CPU .*auto or math"
        ):
            load_recipe("smoke", {"parallelism.cp": 2, "model.attention": kernel})
    load_recipe("smoke", {"parallelism.cp": 2, "model.attention": "math"})
    gpu = {"cluster.gpus_per_node": 2, "cluster.nodes": 1, "parallelism.cp": 2, "model.attention": "flash"}
    assert load_recipe("smoke", gpu | {"train.device": "auto"}).model.attention == "flash"
