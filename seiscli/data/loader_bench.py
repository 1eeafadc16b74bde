"""Measure the crop loader as the trainer drives it: delivered bytes/s and samples/s, per worker and per CPU
second. Used by `seis data bench` and benchmarks/bench_s3_loader.py."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from seiscli.recipe import Recipe, validate

Shape3 = tuple[int, int, int]


def bench_recipe(
    uris: list[str],
    *,
    crop: Shape3,
    micro_batch: int = 1,
    workers: int = 2,
    prefetch: int = 2,
    concurrency: int = 32,
    client: str = "obstore",
    endpoint_url: str | None = None,
    region: str | None = None,
    min_live_fraction: float = 0.0,
    seed: int = 0,
) -> Recipe:
    """A recipe that only the loader reads: the patch size is the largest of 16, 8, 4, 2, 1 dividing the crop."""
    patch = next(p for p in (16, 8, 4, 2, 1) if all(c % p == 0 for c in crop))
    data = {
        "source": "mdio",
        "uris": uris,
        "crop": list(crop),
        "workers": workers,
        "prefetch": prefetch,
        "concurrency": concurrency,
        "s3_client": client,
        "endpoint_url": endpoint_url,
        "region": region,
        "min_live_fraction": min_live_fraction,
    }
    model = {"patch_size": patch, "encoder_dim": 16, "encoder_heads": 1, "decoder_dim": 16, "decoder_heads": 1}
    return validate(
        {"name": "bench", "model": model, "data": data, "train": {"micro_batch": micro_batch, "seed": seed}}
    )


@dataclass
class LoaderBench:
    seconds: float
    samples: int
    decoded_bytes: int
    bytes_read: int
    requests: int
    retries: int
    cpu_s: float  # loader processes' CPU time in the window
    workers: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def bytes_per_s(self) -> float:
        return self.decoded_bytes / self.seconds

    @property
    def read_bytes_per_s(self) -> float:
        """Bytes fetched from the store per second, as stored (compressed, whole chunks)."""
        return self.bytes_read / self.seconds

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def bytes_per_cpu_s(self) -> float:
        return self.decoded_bytes / self.cpu_s if self.cpu_s > 0 else math.nan


def bench_loader(
    recipe: Recipe,
    *,
    seconds: float,
    warmup_batches: int = 2,
    max_batches: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> LoaderBench:
    """Iterate the loader for `seconds` after `warmup_batches` (worker start-up is not throughput)."""
    import torch

    from seiscli.train.data import build_loader

    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    it = iter(loader)
    try:
        for _ in range(warmup_batches):
            next(it)
        base, base_workers = loader.stats(), loader.worker_stats()
        t0 = time.perf_counter()
        last = t0
        n = 0
        while time.perf_counter() - t0 < seconds and (max_batches is None or n < max_batches):
            next(it)
            n += 1
            now = time.perf_counter()
            if progress is not None and now - last >= 0.5:
                last = now
                s = loader.stats()
                dt = now - t0
                progress(
                    {
                        "elapsed_s": dt,
                        "bytes_per_s": (s["decoded_bytes"] - base["decoded_bytes"]) / dt,
                        "read_bytes_per_s": (s["bytes_read"] - base["bytes_read"]) / dt,
                        "samples_per_s": (s["samples"] - base["samples"]) / dt,
                        "retries": s["retries"] - base["retries"],
                        "workers": _worker_rates(loader.worker_stats(), base_workers, dt),
                    }
                )
        dt = time.perf_counter() - t0
        s = loader.stats()
        return LoaderBench(
            seconds=dt,
            samples=int(s["samples"] - base["samples"]),
            decoded_bytes=int(s["decoded_bytes"] - base["decoded_bytes"]),
            bytes_read=int(s["bytes_read"] - base["bytes_read"]),
            requests=int(s["requests"] - base["requests"]),
            retries=int(s["retries"] - base["retries"]),
            cpu_s=s["worker_cpu_s"] - base["worker_cpu_s"],
            workers=_worker_rates(loader.worker_stats(), base_workers, dt),
        )
    finally:
        loader.close()


def _worker_rates(
    now: dict[int, dict[str, float]], base: dict[int, dict[str, float]], dt: float
) -> dict[int, dict[str, float]]:
    out = {}
    for w, s in now.items():
        b = base.get(w, {})
        decoded = s["decoded_bytes"] - b.get("decoded_bytes", 0)
        cpu = s["cpu_s"] - b.get("cpu_s", 0)
        out[w] = {
            "bytes_per_s": decoded / dt,
            "read_bytes_per_s": (s["bytes_read"] - b.get("bytes_read", 0)) / dt,
            "samples_per_s": (s["samples"] - b.get("samples", 0)) / dt,
            "busy": (s["busy_s"] - b.get("busy_s", 0)) / dt,
            "cpu_s": cpu,
        }
    return out
