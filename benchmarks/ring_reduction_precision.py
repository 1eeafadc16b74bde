"""Relative error of a gradient sum over R ranks reduced round a ring, rounding to bf16 or fp32 at every hop.

A ring reduce-scatter (NCCL's all-reduce on one node row, DeepSpeed's ZeRO reduction) adds one rank's
contribution per hop to a running partial sum that travels in the communication dtype, so every hop rounds
the partial sum to it. This simulates that on CPU: rank r's gradient is a shared signal plus rank-specific
noise (ranks see different samples), rounded to the dtype it is held in (bf16 gradients under ZeRO's
defaults), then summed hop by hop in that dtype; the reference is the fp64 sum of the same values.

    python benchmarks/ring_reduction_precision.py [--ranks 128] [--numel 1048576] [--noise 3.0]

Prints, per dtype, the relative L2 error of the summed gradient and the median per-element relative error.
"""

from __future__ import annotations

import argparse

import torch


def ring_sum(ranks: int, numel: int, noise: float, dtype: torch.dtype, seed: int = 0) -> tuple[float, float]:
    """(relative L2 error, median element-wise relative error) of the ring sum in `dtype` against fp64."""
    signal = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = torch.zeros(numel, dtype=torch.float64)
    partial = torch.zeros(numel, dtype=dtype)
    for r in range(ranks):
        gen = torch.Generator().manual_seed(seed + 1 + r)
        local = (signal + noise * torch.randn(numel, generator=gen, dtype=torch.float64)).to(dtype)
        exact += local.double()  # what each rank holds, summed exactly: only the reduction's rounding counts
        partial = partial + local  # one hop: add the local contribution, the result travels in `dtype`
    diff = partial.double() - exact
    l2 = float(diff.norm() / exact.norm())
    elementwise = float((diff.abs() / exact.abs().clamp_min(1e-30)).median())
    return l2, elementwise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=128)
    parser.add_argument("--numel", type=int, default=1 << 20)
    parser.add_argument("--noise", type=float, default=3.0, help="per-rank noise std / shared signal std")
    args = parser.parse_args()
    print(f"ring sum over {args.ranks} ranks, {args.numel} elements, noise/signal {args.noise}")
    print(f"{'dtype':<10}{'rel. L2 error':>16}{'median elem. rel. error':>26}")
    for dtype in (torch.bfloat16, torch.float32):
        l2, med = ring_sum(args.ranks, args.numel, args.noise, dtype)
        print(f"{str(dtype).removeprefix('torch.'):<10}{l2:>16.2e}{med:>26.2e}")


if __name__ == "__main__":
    main()
