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
