"""Ring attention: exact non-causal attention over a sequence split across a context-parallel group.

Each rank holds one contiguous shard of the tokens (q, k, v of shape (B, H, S_local, D)). K and V travel
round the ring (rank r sends to r+1, receives from r-1) while each rank attends its queries to the block
it holds; partial results are merged with their log-sum-exp, so the output equals full attention over
all ranks' tokens, and no rank ever holds more than two K/V blocks (memory falls as 1/cp, unlike an
all-gather). The backward pass re-runs each block's backward with the final output and log-sum-exp
while dK/dV travel round the ring back to the rank that owns them.

The transfer of the next block is posted before the current block's compute, so it overlaps.
Block kernels, all returning (out, lse) with lse of shape (B, H, S) in fp32:
  math      explicit softmax in fp32 (any device; the reference)
  cpu_flash aten's CPU flash kernel (what SDPA uses on CPU)
  flash     aten's CUDA flash kernel
  cudnn     aten's cuDNN kernel (fastest on H100/H200)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

BLOCK_BACKENDS = ("math", "cpu_flash", "flash", "cudnn")
CUDA_ONLY = ("flash", "cudnn")  # aten's CUDA kernels: no CPU implementation


def default_block_backend(device: torch.device, preferred: str = "auto") -> str:
    if preferred != "auto":
        if preferred not in BLOCK_BACKENDS:
            raise ValueError(f"ring attention backend {preferred!r}; allowed: {', '.join(BLOCK_BACKENDS)}")
        if preferred in CUDA_ONLY and device.type != "cuda":
            raise ValueError(
                f"model.attention={preferred!r} with parallelism.cp > 1 needs CUDA (ring attention's {preferred} "
                f"block kernel is aten's CUDA one); on {device.type} use model.attention auto or math"
            )
        return preferred
    return "cudnn" if device.type == "cuda" else "cpu_flash"


class RingShapeError(ValueError):
    """The ranks of a context-parallel group hold blocks of different shapes (the ring needs equal ones)."""


_verified: set[tuple[int, tuple[int, ...]]] = set()  # (id of the group, local q and k shapes) found equal


def check_equal_shapes(q: torch.Tensor, k: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Raise RingShapeError on every rank when the group's local q/k shapes differ. Collective on the first call
    with a given group and shape only (the shapes follow the masking plan, fixed for a run), so a step pays
    nothing; unchecked, gloo aborts with a C++ error and NCCL hangs or exchanges garbage."""
    mine = (*q.shape, *k.shape)
    key = (id(group), mine)
    if key in _verified:
        return
    local = torch.tensor(mine, dtype=torch.int64, device=q.device)
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, local, group=group)
    shapes = [tuple(r.tolist()) for r in rows]
    if any(s != shapes[0] for s in shapes):
        each = "; ".join(f"rank {i}: q {s[: q.dim()]} k {s[q.dim() :]}" for i, s in enumerate(shapes))
        raise RingShapeError(
            f"ring attention: the context-parallel group's local blocks differ ({each}); every rank of a cp group "
            "must hold the same number of tokens (the crop's tokens split evenly over parallelism.cp)"
        )
    _verified.add(key)


# -- block kernels ---------------------------------------------------------------------------------


def _block_forward(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Attention of q to one K/V block: (out, lse fp32 (B,H,S), extra state the backward needs)."""
    acc = _acc_dtype(q)
    if backend == "math":
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(acc))
        return out.to(q.dtype), lse, None
    if backend == "cpu_flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out, lse.to(acc), None
    if backend == "flash":
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return r[0], r[1].to(acc), r[2:8]  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed, offset
    if backend == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
        lse = r[1].reshape(q.shape[:-1]).to(acc)  # cuDNN's lse carries a trailing 1
        return r[0], lse, r[2:8]
    raise ValueError(f"ring attention backend {backend!r}; allowed: {', '.join(BLOCK_BACKENDS)}")


def _block_backward(
    backend: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    extra: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the FINAL (merged) out and lse: the flash-attention identity."""
    if backend == "math":
        acc = _acc_dtype(q)
        qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
        p = torch.exp(torch.matmul(qf, kf.transpose(-1, -2)) * scale - lse.to(acc).unsqueeze(-1))
        dv = torch.matmul(p.transpose(-1, -2), dof)
        dp = torch.matmul(dof, vf.transpose(-1, -2))
        delta = (dof * out.to(acc)).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        return torch.matmul(ds, kf) * scale, torch.matmul(ds.transpose(-1, -2), qf) * scale, dv
    if backend == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out.to(q.dtype), lse.to(_acc_dtype(q)), 0.0, False, scale=scale
        )
    if backend == "flash":
        cum_q, cum_k, max_q, max_k, seed, offset = extra
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out.to(q.dtype), lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset, scale=scale
        )
    if backend == "cudnn":
        cum_q, cum_k, max_q, max_k, seed, offset = extra
        # cuDNN asserts that out and dout have equal strides (pytorch/pytorch#176915).
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout.contiguous(),
            q,
            k,
            v,
            out.to(q.dtype).contiguous(),
            lse.unsqueeze(-1),
            seed,
            offset,
            None,
            cum_q,
            cum_k,
            max_q,
            max_k,
            0.0,
            False,
            scale=scale,
        )
    raise ValueError(f"ring attention backend {backend!r}")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32, or in fp64 when the inputs are fp64 (reference runs in tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _merge(out: torch.Tensor, lse: torch.Tensor, b_out: torch.Tensor, b_lse: torch.Tensor) -> None:
    """In place: (out, lse) <- softmax-weighted union of two partial results, without overflow."""
    out.sub_(torch.sigmoid(b_lse - lse).unsqueeze(-1) * (out - b_out))
    lse.sub_(F.logsigmoid(lse - b_lse))


# -- the ring ----------------------------------------------------------------------------------------


class _Ring:
    """Send a buffer to the next rank of the group while receiving the previous rank's."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        me, n = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (me + 1) % n)
        self.prev = dist.get_global_rank(group, (me - 1) % n)
        self._reqs: list[Any] = []

    def start(self, send: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send)
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group),
            dist.P2POp(dist.irecv, recv, self.prev, self.group),
        ]
        self._reqs = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        for req in self._reqs:
            req.wait()
        self._reqs = []


def _pack(*ts: torch.Tensor) -> torch.Tensor:
    return torch.stack([t.contiguous() for t in ts])


def ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, scale: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    n = dist.get_world_size(group)
    ring = _Ring(group)
    kv = _pack(k, v)
    out: torch.Tensor | None = None
    lse = torch.empty(0)
    extras = []
    for step in range(n):
        nxt = ring.start(kv) if step + 1 < n else None
        b_out, b_lse, extra = _block_forward(backend, q, kv[0], kv[1], scale)
        extras.append(extra)
        if out is None:
            out, lse = b_out.to(_acc_dtype(q)), b_lse.clone()
        else:
            _merge(out, lse, b_out.to(out.dtype), b_lse)
        if nxt is not None:
            ring.wait()
            kv = nxt
    assert out is not None
    return out.to(q.dtype), lse, extras


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    group: dist.ProcessGroup,
    scale: float,
    backend: str,
    extras: list[Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = dist.get_world_size(group)
    kv_ring, dkv_ring = _Ring(group), _Ring(group)
    kv = _pack(k, v)
    acc = _acc_dtype(q)
    dq = torch.zeros_like(q, dtype=acc)
    dkv_in: torch.Tensor | None = None
    for step in range(n):
        nxt = kv_ring.start(kv) if step + 1 < n else None
        bdq, bdk, bdv = _block_backward(backend, dout, q, kv[0], kv[1], out, lse, scale, extras[step])
        dq.add_(bdq.to(acc))
        dkv = _pack(bdk.to(acc), bdv.to(acc))
        if dkv_in is not None:
            dkv_ring.wait()
            dkv.add_(dkv_in)  # the gradients the previous ranks computed for this same K/V block
        # Send this block's accumulated gradient on; after n sends it is back with its owner.
        dkv_in = dkv_ring.start(dkv)
        if nxt is not None:
            kv_ring.wait()
            kv = nxt
    dkv_ring.wait()
    assert dkv_in is not None
    return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        group: dist.ProcessGroup,
        scale: float,
        backend: str,
    ) -> torch.Tensor:
        # The kernels choose their dtypes themselves (fp32 accumulation); the trainer's bf16 autocast would
        # otherwise run the math kernel's "fp32" matmuls in bf16 (~1e-2 error instead of ~1e-6).
        with torch.autocast(q.device.type, enabled=False):
            out, lse, extras = ring_forward(q, k, v, group, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.backend, ctx.extras = group, scale, backend, extras
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.group, ctx.scale, ctx.backend, ctx.extras)
        return dq, dk, dv, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact non-causal attention of the local queries to every rank's keys/values in `group`.

    With no group (or a group of one) this is plain SDPA, so cp=1 runs use the same kernels as before.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if group is None or dist.get_world_size(group) == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    backend = default_block_backend(q.device, backend)
    check_equal_shapes(q, k, group)
    return _RingAttention.apply(q, k, v, group, scale, backend)
