"""Ring attention's per-rank compute on one GPU: a single-process simulated ring at long-context shard sizes.

One rank of a context-parallel group of `cp` holds S_local query tokens and, over a ring pass, attends them to
`cp` K/V blocks of S_local tokens each, merging the partial results by log-sum-exp; the backward re-runs each
block's backward with the merged output. Here the `cp` blocks live on one GPU (no communication), so the time is
the compute-only rate that a multi-GPU ring should approach when its transfers hide behind compute. Against it:
one kernel call of S_local queries over all cp*S_local keys (the same FLOPs, no ring and no merges).

Shapes of the long-context recipe (1,536 x 1,536 x 2,048 crop = 1,179,648 tokens of 16^3, cp = 8, mask 0.75):
encoder 8 heads of 128 over the visible quarter (36,864 tokens per rank), decoder 4 heads of 128 over all
tokens (147,456 per rank).

    python benchmarks/ring_blocks_gpu.py [--cp 8] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from bench_gpu import cuda_median_s  # this script's directory is on sys.path when run as a script

from seiscli.train.parallel.ring_attention import _block_backward, _block_forward, _merge

SHAPES = {  # name: (heads, local tokens per rank at cp=8, head dim)
    "encoder": (8, 36_864, 128),
    "decoder": (4, 147_456, 128),
}


def ring_pass(backend: str, q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], dout: torch.Tensor):
    """Forward over all blocks (merging), then each block's backward with the merged out/lse."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse, extras = None, None, []
    for k, v in zip(ks, vs, strict=True):
        b_out, b_lse, extra = _block_forward(backend, q, k, v, scale)
        extras.append(extra)
        if out is None:
            out, lse = b_out.float(), b_lse.clone()
        else:
            _merge(out, lse, b_out.float(), b_lse)
    out = out.to(q.dtype)
    dq = torch.zeros_like(q, dtype=torch.float32)
    for k, v, extra in zip(ks, vs, extras, strict=True):
        g_q, _, _ = _block_backward(backend, dout, q, k, v, out, lse, scale, extra)
        dq += g_q
    return out, dq


def forward_only(backend: str, q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> None:
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = None, None
    for k, v in zip(ks, vs, strict=True):
        b_out, b_lse, _ = _block_forward(backend, q, k, v, scale)
        if out is None:
            out, lse = b_out.float(), b_lse.clone()
        else:
            _merge(out, lse, b_out.float(), b_lse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cp", type=int, default=8)
    ap.add_argument("--backends", nargs="*", default=["cudnn", "flash"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for name, (heads, s_local, d) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)

        def rnd(s: int) -> torch.Tensor:
            return torch.randn(1, heads, s, d, device=dev, dtype=torch.bfloat16, generator=g)  # noqa: B023

        q, dout = rnd(s_local), rnd(s_local)
        ks, vs = [rnd(s_local) for _ in range(args.cp)], [rnd(s_local) for _ in range(args.cp)]
        k_all, v_all = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        # One rank's attention FLOPs per pass: QK^T and PV, 2 multiply-adds each -> 4*H*Sq*Sk*D; backward 2.5x.
        fwd_flops = 4 * heads * s_local * (args.cp * s_local) * d
        for backend in args.backends:
            t_fwd = cuda_median_s(lambda: forward_only(backend, q, ks, vs), args.reps)  # noqa: B023
            t_all = cuda_median_s(lambda: ring_pass(backend, q, ks, vs, dout), args.reps)  # noqa: B023
            one = torch.nn.attention.SDPBackend.CUDNN_ATTENTION if backend == "cudnn" else None
            one = one or torch.nn.attention.SDPBackend.FLASH_ATTENTION
            with torch.nn.attention.sdpa_kernel(one):
                t_one = cuda_median_s(
                    lambda: torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all),  # noqa: B023
                    args.reps,
                )
            rows.append(
                {
                    "shape": name,
                    "heads": heads,
                    "tokens_per_rank": s_local,
                    "cp": args.cp,
                    "backend": backend,
                    "ring_fwd_s": t_fwd,
                    "ring_fwd_bwd_s": t_all,
                    "one_call_fwd_s": t_one,
                    "fwd_tflops": fwd_flops / t_fwd / 1e12,
                    "fwd_bwd_tflops": 3.5 * fwd_flops / t_all / 1e12,
                    "ring_over_one_call": t_fwd / t_one,
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                }
            )
            torch.cuda.reset_peak_memory_stats()
    hdr = f"{'shape':8} {'backend':7} {'S/rank':>8} {'fwd s':>7} {'fwd+bwd s':>9} {'fwd TF/s':>8} "
    print(hdr + f"{'f+b TF/s':>8} {'ring/one':>8} {'peak GiB':>8}")
    for r in rows:
        print(
            f"{r['shape']:8} {r['backend']:7} {r['tokens_per_rank']:>8,} {r['ring_fwd_s']:7.3f} "
            f"{r['ring_fwd_bwd_s']:9.3f} {r['fwd_tflops']:8.0f} {r['fwd_bwd_tflops']:8.0f} "
            f"{r['ring_over_one_call']:8.2f} {r['peak_gib']:8.1f}"
        )
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
