"""Data path timings: synthetic generation, MDIO write/read, and the crop loader's samples/s.

    python benchmarks/bench_data.py [--big 512] [--repeat 3] [--batches 60]

Prints one table; medians over --repeat runs. CPU only, local files (the S3 path is measured separately).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import open_volume
from seiscli.data.write import write_volume
from seiscli.recipe import load_recipe
from seiscli.train.data import build_loader


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loader_rate(overrides: dict[str, object], batches: int) -> float:
    recipe = load_recipe("smoke", overrides)
    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    it = iter(loader)
    next(it)  # start-up (workers, cache) is not throughput
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * recipe.train.micro_batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batches", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mdio.api.io  # noqa: F401  (import cost is not write cost)

    rows: list[tuple[str, str, str]] = []
    small, big = (96, 128, 160), (args.big,) * 3
    for shape in (small, big):
        t = median_time(lambda s=shape: synthetic_volume(s, 0), args.repeat)
        mvox = (shape[0] * shape[1] * shape[2]) / 1e6
        rows.append((f"synth {'x'.join(map(str, shape))}", f"{t:.3f} s", f"{mvox / t:.0f} Mvoxel/s"))

    with tempfile.TemporaryDirectory() as tmp:
        vol = synthetic_volume(big, 0)
        gib = vol.nbytes / 2**30
        for comp in ("zstd", "lz4"):
            path = str(Path(tmp) / f"{comp}.mdio")
            t = median_time(lambda p=path, c=comp: write_volume(p, vol, compressor=c, overwrite=True), 1)
            rows.append((f"write {args.big}^3 {comp} (incl. stats)", f"{t:.2f} s", f"{gib / t * 1024:.0f} MiB/s"))
            v = open_volume(path)
            t = median_time(lambda v=v: v.read((0, 0, 0), big), args.repeat)
            rows.append((f"read {args.big}^3 {comp}, whole", f"{t:.2f} s", f"{gib / t * 1024:.0f} MiB/s"))

        os.environ["SEIS_DATA_DIR"] = tmp
        for workers in (0, 2):
            rate = loader_rate({"data.workers": workers}, args.batches)
            rows.append((f"loader smoke (64^3 crop, mb 4), workers={workers}", f"{rate:.0f} samples/s", "64^3 chunks"))
        for chunks in (64, 128):
            path = str(Path(tmp) / f"smoke-c{chunks}.mdio")
            write_volume(path, synthetic_volume((96, 128, 160), 0), chunks=(chunks,) * 3)
            rate = loader_rate({"data.source": "mdio", "data.uris": [path], "data.workers": 0}, args.batches)
            rows.append((f"loader smoke, workers=0, chunks {chunks}^3", f"{rate:.0f} samples/s", f"{chunks}^3 chunks"))

    table = Table("what", "time / rate", "note", title=f"data path, {platform.node()}, {os.cpu_count()} CPUs")
    for r in rows:
        table.add_row(*r)
    Console().print(table)


if __name__ == "__main__":
    main()
