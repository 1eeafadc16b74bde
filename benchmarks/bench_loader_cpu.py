"""Loader CPU per delivered GB: core-seconds that the crop loader costs (its worker processes and the trainer
process's loader threads), per GB of float32 crops delivered to the device, at full loader speed.

    python benchmarks/bench_loader_cpu.py --uri VOL.mdio --crop 640 640 1024 --workers 8 --device cuda \
        [--endpoint http://...] [--batches 12] [--json out.json]
    python benchmarks/bench_loader_cpu.py --casts          # CPU cost per GB of the host-side conversions

It uses only `build_loader`, `state`/`stats` and `close`, so the same script measures an older checkout of
seiscli (PYTHONPATH=that checkout) for a before/after in one run. CPU comes from /proc: utime + stime of the
process's descendants (forkserver and DataLoader workers: decode, S3 client, copies) and of this process
(pin-memory or copy thread, H2D, device normalisation launches), between the end of warm-up and the end of the
window. Each batch is synchronised on the device (what a training step does before the next one). Warm-up
drains what the workers prefetch (workers x prefetch batches, plus the ring's margin) so that the window
measures building batches, not handing out ready ones (a 10-batch window after 2 did not, 2026-12-02).
`--casts` times, on one thread, the host passes a worker could do per GB of float32: today's normalisation,
a cast to bf16 (torch) and to fp16 (numpy), against shipping the stored dtype (no pass).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TICK = os.sysconf("SC_CLK_TCK")
GPU_RATE = 0.58  # samples/s one H200 consumes on the pretrain recipe (issue 13)


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime + stime seconds) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def cpu_split(root: int) -> tuple[float, float]:
    """(CPU s of `root` itself, CPU s of its live descendants)."""
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (s := _stat(int(name))) is not None:
            procs[int(name)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        total += procs[pid][1]
        stack.extend(children.get(pid, []))
    return procs.get(root, (0, 0.0))[1], total


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from seiscli.data.loader_bench import bench_recipe
    from seiscli.train.data import build_loader

    recipe = bench_recipe(
        [args.uri],
        crop=tuple(args.crop),
        workers=args.workers,
        prefetch=args.prefetch,
        concurrency=args.concurrency,
        endpoint_url=args.endpoint,
    )
    device = torch.device(args.device)
    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=device)
    t_start = time.perf_counter()
    it = iter(loader)
    first = None
    try:
        warmup = args.warmup if args.warmup is not None else args.workers * args.prefetch + 2
        for i in range(warmup):
            x = next(it)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i == 0:
                first = time.perf_counter() - t_start
        self0, kids0 = cpu_split(os.getpid())
        t0 = time.perf_counter()
        for _ in range(args.batches):
            x = next(it)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        self1, kids1 = cpu_split(os.getpid())
        assert x.dtype == torch.float32 and x.device.type == device.type
    finally:
        loader.close()
    samples = args.batches * recipe.train.micro_batch
    gb = samples * int(np.prod(args.crop)) * 4 / 1e9
    workers_s, main_s = kids1 - kids0, self1 - self0
    core_s = workers_s + main_s
    return {
        "code": args.label,
        "uri": args.uri,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "crop": args.crop,
        "workers": args.workers,
        "prefetch": args.prefetch,
        "samples": samples,
        "wall_s": wall,
        "first_batch_s": first,
        "samples_per_s": samples / wall,
        "gb_per_s": gb / wall,
        "workers_cpu_s": workers_s,
        "main_cpu_s": main_s,
        "core_s_per_gb": core_s / gb,
        "workers_core_s_per_gb": workers_s / gb,
        "main_core_s_per_gb": main_s / gb,
        "cores_at_gpu_rate": core_s / samples * GPU_RATE,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def casts(gb: float = 0.5, repeat: int = 3) -> dict[str, float]:
    """Single-thread CPU seconds per GB of float32 for each host-side pass (median of `repeat`)."""
    from seiscli.train.data import normalize_

    torch.set_num_threads(1)
    n = int(gb * 1e9 / 4)
    x = (np.random.default_rng(0).standard_normal(n) * 3).astype(np.float32)
    f16 = np.empty(n, dtype=np.float16)
    bf16 = torch.empty(n, dtype=torch.bfloat16)
    work = x.copy()

    def timed(fn: Any) -> float:
        ts = []
        for _ in range(repeat):
            work[...] = x
            t = time.process_time()
            fn()
            ts.append(time.process_time() - t)
        return sorted(ts)[len(ts) // 2] / gb

    return {
        "normalize_ (today, in the worker)": timed(lambda: normalize_(work, (0.1, 2.0), 4.0)),
        "cast to bf16 (torch)": timed(lambda: bf16.copy_(torch.from_numpy(work))),
        "cast to fp16 (numpy)": timed(lambda: np.copyto(f16, work, casting="same_kind")),
        "stored dtype (nothing)": 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri")
    ap.add_argument("--endpoint")
    ap.add_argument("--crop", type=int, nargs=3, default=[640, 640, 1024])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--warmup", type=int, help="batches before the window (default: workers * prefetch + 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--casts", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, Any] = casts() if args.casts else measure(args)
    print(json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
