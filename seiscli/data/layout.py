"""A training layout for object storage, and what a crop costs in it.

Random crop origins on MDIO's 128^3 chunks fetch whole chunks beyond the crop's edges (1.6x the bytes at the
pretrain crop 640x640x1024). The training layout is Zarr v3 sharding: small inner chunks (32^3, 128 KiB) so that a
crop at any origin reads little it does not use (1.13x at the pretrain crop), in shards of 64 x 64 x the whole time
axis (18 MiB raw at 1152 samples) whose inner chunks are written in C order (seiscli.data.shards.write_region):
the inner chunks of one (inline, crossline) row then lie end to end, and a crop reads each row of its box as one
range GET (441 GETs of ~4 MB for the pretrain crop; zarr's Morton order would need ~1,300 of ~1.5 MB).

Everything here is arithmetic on shapes; it needs neither zarr nor the data.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

Shape3 = tuple[int, int, int]

INNER: Shape3 = (32, 32, 32)  # amplification at the pretrain crop: 1.048 x 1.048 x 1.030 = 1.13 (random origins)
SHARD: Shape3 = (64, 64, 0)  # 0: the whole axis (rounded up to the inner chunks); 2 x 2 x 36 inner chunks at 1152
MAX_GAP_BYTES = 0  # runs are merged only when adjacent: any gap read is amplification
MAX_RANGE_BYTES = 16 * 2**20  # one range GET at most; S3 serves 8-16 MB ranges at a request's full rate


@dataclass(frozen=True)
class CropCost:
    """Expected cost of one crop at a uniformly random origin (mean over `samples` origins)."""

    amplification: float  # bytes fetched / bytes of the crop (raw, before compression)
    gets: float  # range GETs per crop, shard indexes not counted (read once per process)
    shards: float  # shard objects touched per crop
    full_shards: float  # of those, read whole (one GET each)
    mean_get_bytes: float  # raw bytes per GET


def resolve_shards(shards: Shape3, shape: Shape3, inner: Shape3) -> Shape3:
    """Shards with each 0 replaced by its axis length rounded up to a multiple of the inner chunk."""
    return tuple(s or -(-n // k) * k for s, n, k in zip(shards, shape, inner, strict=True))  # type: ignore[return-value]


def axis_amplification(n: int, crop: int, chunk: int) -> float:
    """Mean over every origin in [0, n - crop] of (bytes of the chunks touched on this axis) / crop."""
    if crop > n:
        raise ValueError(f"crop {crop} exceeds the axis length {n}")
    origins = np.arange(n - crop + 1)
    first, last = origins // chunk, (origins + crop - 1) // chunk
    covered = np.minimum((last + 1) * chunk, n) - first * chunk
    return float(covered.mean() / crop)


def read_amplification(shape: Shape3, crop: Shape3, chunks: Shape3) -> float:
    """Expected fetched / used bytes for random origins: the axes are independent, so the mean is the product."""
    return math.prod(axis_amplification(n, c, k) for n, c, k in zip(shape, crop, chunks, strict=True))


def c_rank(grid: Shape3) -> np.ndarray:
    """rank[i, j, k]: the position of inner chunk (i, j, k) in a shard written in C order (ours)."""
    return np.arange(math.prod(grid)).reshape(grid)


def morton_rank(grid: Shape3) -> np.ndarray:
    """rank[i, j, k]: the position of inner chunk (i, j, k) in a shard as zarr writes it (Morton order, the first
    axis fastest; zarr.core.indexing.decode_morton)."""
    bits = [max(0, (g - 1).bit_length()) for g in grid]
    coords = np.indices(grid).reshape(3, -1)
    code = np.zeros(coords.shape[1], dtype=np.int64)
    out_bit = 0
    for b in range(max(bits) if bits else 0):
        for axis in range(3):
            if b < bits[axis]:
                code |= ((coords[axis] >> b) & 1) << out_bit
                out_bit += 1
    rank = np.empty(coords.shape[1], dtype=np.int64)
    rank[np.argsort(code, kind="stable")] = np.arange(coords.shape[1])
    return rank.reshape(grid)


def runs(positions: np.ndarray, sizes: np.ndarray, max_gap: int, max_bytes: int) -> list[tuple[int, int]]:
    """Coalesce byte ranges: `positions` are start offsets, `sizes` lengths (any order). Ranges merge when the gap
    between them is <= max_gap and the merged range stays <= max_bytes. Returns (start, end) pairs."""
    order = np.argsort(positions, kind="stable")
    out: list[tuple[int, int]] = []
    for i in order:
        s, e = int(positions[i]), int(positions[i] + sizes[i])
        if out and s - out[-1][1] <= max_gap and e - out[-1][0] <= max_bytes:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def crop_cost(
    shape: Shape3,
    crop: Shape3,
    inner: Shape3,
    shard: Shape3 | None,
    *,
    samples: int = 64,
    max_gap: int = MAX_GAP_BYTES,
    max_bytes: int = MAX_RANGE_BYTES,
    seed: int = 0,
    order: str = "c",
) -> CropCost:
    """Expected GETs and amplification of a crop at random origins, inner chunks all of equal stored size (the
    GET count does not depend on it when max_gap is 0). Without `shard` every chunk is its own object. `order`: how
    inner chunks lie in a shard, "c" (seis data rechunk) or "morton" (zarr-python's own writes)."""
    if any(c > n for c, n in zip(crop, shape, strict=True)):
        raise ValueError(f"crop {crop} exceeds the volume {shape}")
    amp = read_amplification(shape, crop, inner)
    inner_bytes = math.prod(inner) * 4
    if shard is None:
        gets = math.prod(
            float(np.mean([(o + c - 1) // k - o // k + 1 for o in range(n - c + 1)]))
            for n, c, k in zip(shape, crop, inner, strict=True)
        )
        return CropCost(amp, gets, gets, gets, inner_bytes)
    shard = resolve_shards(shard, shape, inner)
    per = tuple(s // k for s, k in zip(shard, inner, strict=True))
    rank = (c_rank if order == "c" else morton_rank)(per)  # type: ignore[arg-type]
    rng = random.Random(seed)
    tot_gets = tot_shards = tot_full = tot_bytes = 0
    for _ in range(samples):
        origin = [rng.randint(0, n - c) for n, c in zip(shape, crop, strict=True)]
        # inner-chunk index range touched on each axis, then split per shard
        lo = [o // k for o, k in zip(origin, inner, strict=True)]
        hi = [(o + c - 1) // k for o, c, k in zip(origin, crop, inner, strict=True)]
        spans = []
        for a in range(3):
            spans.append(
                [
                    (max(lo[a], s * per[a]) - s * per[a], min(hi[a], s * per[a] + per[a] - 1) - s * per[a])
                    for s in range(lo[a] // per[a], hi[a] // per[a] + 1)
                ]
            )
        for sz in spans[0]:
            for sy in spans[1]:
                for sx in spans[2]:
                    tot_shards += 1
                    box = rank[sz[0] : sz[1] + 1, sy[0] : sy[1] + 1, sx[0] : sx[1] + 1]
                    if box.size == rank.size:  # read whole: one GET (zarr's rule, and ours)
                        tot_full += 1
                        tot_gets += 1
                        tot_bytes += box.size * inner_bytes
                        continue
                    pos = box.ravel() * inner_bytes
                    merged = runs(pos, np.full(pos.size, inner_bytes), max_gap, max_bytes)
                    tot_gets += len(merged)
                    tot_bytes += sum(e - s for s, e in merged)
    # No gaps read: the exact expectation; with gaps, the sampled one (gap bytes are amplification too).
    sampled = tot_bytes / samples / (math.prod(crop) * 4)
    return CropCost(
        amp if max_gap == 0 else sampled, tot_gets / samples, tot_shards / samples, tot_full / samples,
        tot_bytes / tot_gets,
    )  # fmt: skip
