"""The S3 streaming loader against the store's ceiling, over real HTTP to a local S3 server (SeaweedFS or moto).

    python benchmarks/bench_s3_loader.py [--quick] [--server seaweed|moto] [--shards Z Y X] [--seconds 8]
        [--latency-ms 30] [--json out.json]

1. The S3 server runs in its own process: SeaweedFS (`weed server -s3`, seiscli.data.seaweed; the default) or
   moto (`python -m seiscli.data.s3local moto`); in front of it two fault proxies (seiscli.data.s3local.FaultProxy,
   also own processes): +0 ms and +LATENCY ms per request (an asyncio sleep before each request is forwarded).
   With --shards the volumes are written in the training layout: shards of that shape holding --chunks inner
   chunks (seiscli.data.layout), and the ceiling GETs whole shard objects.
2. A few synthetic MDIO volumes are written to it (fake credentials, AWS_ACCESS_KEY_ID=testing).
3. Ceiling: raw GETs of the same chunk objects (`amplitude/c/...`), random order, N in flight, with obstore
   (async, the loader's client) and with plain threads (urllib3 on presigned URLs).
   The best (client, N) is the ceiling of that path (direct, proxy +0 ms, proxy +LATENCY ms); it is measured
   again just before and after each loader row and the row's ratios use their mean, because the load that other
   work puts on a shared machine drifts over minutes.
4. Loader: `seiscli.data.loader_bench.bench_loader` (what `seis data bench` runs) for workers 0/1/2 at the
   recipe's concurrency (pretrain: 64 GETs in flight per worker, prefetch 4) and a low concurrency for contrast,
   on the same paths, each recipe-concurrency setting with random crop origins and, right after, with
   data.align_crops (origins on the chunk grid; the crop must be a multiple of it, so a crop fetches only the
   chunks it covers). Reported: samples/s, decoded bytes/s delivered, stored (compressed) bytes/s fetched,
   both as ratios of the path's ceiling, loader CPU per delivered byte, and the servers' CPU.

Everything shares this machine's cores: the server (pure Python, CPU-bound) competes with the loader, so the
absolute rates are the server's, not S3's; the ratios inside one run are the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
BUCKET = "seis-bench"
MIB = 2**20
# P5 (p5.48xlarge): 192 vCPUs, 8 GPUs; the reference design streamed 4-5 GB/s per node.
P5_VCPUS = 192
P5_LOADER_VCPUS = 64  # assumed share for loader workers: 8 ranks x 8 workers (recipes/pretrain.yaml), 1 vCPU each
REFERENCE_GBPS = (4.0, 5.0)


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[str]
    endpoint: str

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(name: str, *args: str) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-m", "seiscli.data.s3local", *args], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # "READY <endpoint>", or "" if it died
    if not line.startswith("READY "):
        proc.kill()
        raise RuntimeError(f"{name}: no READY line from seiscli.data.s3local {' '.join(args)} (got {line!r})")
    return Server(name, proc, line.split()[1])


@contextmanager
def servers(latency_ms: float, with_zero_proxy: bool, kind: str = "seaweed") -> Iterator[list[Server]]:
    started: list[Server] = []
    seaweed = None
    try:
        if kind == "seaweed":
            from seiscli.data.seaweed import SeaweedS3

            seaweed = SeaweedS3(access_key=FAKE_AWS["AWS_ACCESS_KEY_ID"], secret_key=FAKE_AWS["AWS_SECRET_ACCESS_KEY"])
            moto = Server("seaweed", seaweed._proc, seaweed.endpoint)  # type: ignore[arg-type]
        else:
            moto = start_server("moto", "moto")
        started.append(moto)
        if with_zero_proxy:
            started.append(start_server("proxy +0 ms", "proxy", "--upstream", moto.endpoint))
        started.append(
            start_server(
                f"proxy +{latency_ms:g} ms", "proxy", "--upstream", moto.endpoint, "--latency-ms", str(latency_ms)
            )
        )
        yield started
    finally:
        for s in started:
            if s.name != "seaweed":
                s.proc.terminate()
                s.proc.wait(10)
        if seaweed is not None:
            seaweed.stop()


# -- data ------------------------------------------------------------------------------------------------------


def write_volumes(
    endpoint: str,
    n: int,
    shape: tuple[int, int, int],
    chunks: tuple[int, int, int],
    shards: tuple[int, int, int] | None = None,
    compressor: str = "zstd",
) -> list[str]:
    import boto3

    from seiscli.data.synth import synthetic_volume
    from seiscli.data.write import write_volume

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    uris = []
    for i in range(n):
        uri = f"s3://{BUCKET}/v{i}.mdio"
        write_volume(uri, synthetic_volume(shape, seed=i), chunks=chunks, shards=shards, compressor=compressor,  # type: ignore[arg-type]
                     storage_options={"endpoint_url": endpoint})  # fmt: skip
        uris.append(uri)
    return uris


def chunk_keys(endpoint: str) -> list[tuple[str, int]]:
    """(key, size) of every amplitude chunk object in the bucket."""
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [(o["Key"], o["Size"]) for p in pages for o in p.get("Contents", []) if "/amplitude/c/" in o["Key"]]


# -- the ceiling: raw GETs of the chunk objects -----------------------------------------------------------------


@dataclass
class Ceiling:
    path: str
    client: str
    concurrency: int
    bytes_per_s: float
    gets_per_s: float
    server_cpu: float  # server CPU-seconds per wall second (moto + proxy)


def _obstore_gets(endpoint: str, keys: list[str], concurrency: int, seconds: float) -> tuple[int, int, float]:
    import obstore

    from seiscli.data.store import _obstore_s3  # the loader's own client configuration

    store = _obstore_s3(f"s3://{BUCKET}", {"endpoint_url": endpoint})
    rng = random.Random(0)

    async def run() -> tuple[int, int, float]:
        total = n = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def one() -> None:
            nonlocal total, n
            while time.perf_counter() < deadline:
                r = await obstore.get_async(store, rng.choice(keys))
                total += len(await r.bytes_async())
                n += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
        return total, n, time.perf_counter() - t0

    return asyncio.run(run())


def _thread_gets(endpoint: str, keys: list[str], concurrency: int, seconds: float) -> tuple[int, int, float]:
    import boto3
    import urllib3

    # presigned once, outside the window: each GET is then bare HTTP, no signing in the loop
    s3 = boto3.client("s3", endpoint_url=endpoint)
    urls = [s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": k}) for k in keys]
    http = urllib3.PoolManager(maxsize=concurrency, retries=False)
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def one(seed: int) -> tuple[int, int]:
        rng, total, n = random.Random(seed), 0, 0
        while time.perf_counter() < deadline:
            r = http.request("GET", rng.choice(urls), preload_content=True)
            if r.status != 200:
                raise RuntimeError(f"GET answered {r.status}: {r.data[:200]!r}")
            total += len(r.data)
            n += 1
        return total, n

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(concurrency)))
    return sum(r[0] for r in results), sum(r[1] for r in results), time.perf_counter() - t0


CLIENTS: dict[str, Callable[[str, list[str], int, float], tuple[int, int, float]]] = {
    "obstore": _obstore_gets,
    "threads": _thread_gets,
}


def cpu_of(path_servers: list[Server]) -> float:
    return sum(s.cpu_s() for s in path_servers)


def ceiling(
    path: str, endpoint: str, on_path: list[Server], keys: list[str], concurrency: int, client: str, seconds: float
) -> Ceiling:
    cpu0 = cpu_of(on_path)
    total, n, dt = CLIENTS[client](endpoint, keys, concurrency, seconds)
    return Ceiling(path, client, concurrency, total / dt, n / dt, (cpu_of(on_path) - cpu0) / dt)


# -- the loader ------------------------------------------------------------------------------------------------


@dataclass
class LoaderRow:
    path: str
    workers: int
    concurrency: int
    aligned: bool  # data.align_crops
    samples_per_s: float
    decoded_per_s: float  # delivered crops, float32
    fetched_per_s: float  # chunk bytes as stored (compressed), read by the loader
    gets_per_s: float
    retries: int
    loader_cpu: float  # loader CPU-seconds per wall second (all its processes and threads)
    server_cpu: float
    decoded_per_cpu_s: float  # delivered bytes per loader CPU-second
    ceiling_per_s: float = 0.0  # the path's ceiling, mean of before and after this row (load drifts)
    ratio_decoded: float = 0.0  # decoded_per_s / ceiling_per_s
    ratio_fetched: float = 0.0  # fetched_per_s / ceiling_per_s


def run_loader(
    path: str,
    endpoint: str,
    on_path: list[Server],
    uris: list[str],
    *,
    crop: tuple[int, int, int],
    workers: int,
    concurrency: int,
    prefetch: int,
    seconds: float,
    aligned: bool,
) -> LoaderRow:
    from seiscli.data.loader_bench import bench_loader, bench_recipe

    recipe = bench_recipe(
        uris, crop=crop, workers=workers, prefetch=prefetch, concurrency=concurrency, endpoint_url=endpoint
    )
    recipe.data.align_crops = aligned
    cpu0, t0 = cpu_of(on_path), time.perf_counter()
    r = bench_loader(recipe, seconds=seconds, warmup_batches=max(2, workers * prefetch))
    server_cpu = (cpu_of(on_path) - cpu0) / (time.perf_counter() - t0)  # includes warm-up: an upper bound
    return LoaderRow(
        path=path,
        workers=workers,
        concurrency=concurrency,
        aligned=aligned,
        samples_per_s=r.samples_per_s,
        decoded_per_s=r.bytes_per_s,
        fetched_per_s=r.bytes_read / r.seconds,
        gets_per_s=r.requests / r.seconds,
        retries=r.retries,
        loader_cpu=r.cpu_s / r.seconds,
        server_cpu=server_cpu,
        decoded_per_cpu_s=r.bytes_per_cpu_s,
    )


# -- report ----------------------------------------------------------------------------------------------------


def mib(x: float) -> str:
    return f"{x / MIB:.1f}"


def print_report(meta: dict[str, Any], ceilings: list[Ceiling], rows: list[LoaderRow]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    con.print(
        f"[bold]S3 streaming loader[/] on {meta['machine']}: {meta['volumes']} volumes {meta['shape']} chunks "
        f"{meta['chunks']} ({meta['chunk_objects']} chunk objects, mean {mib(meta['mean_chunk_bytes'])} MiB stored, "
        f"compression {meta['compression']:.2f}), crop {meta['crop']}",
        highlight=False,
    )
    t = Table("path", "client", "GETs in flight", "MiB/s", "GETs/s", "server CPU", title="ceiling: raw chunk GETs")
    for c in ceilings:
        t.add_row(
            c.path, c.client, str(c.concurrency), mib(c.bytes_per_s), f"{c.gets_per_s:.0f}", f"{c.server_cpu:.2f}"
        )
    con.print(t)
    best = meta["ceiling"]
    t = Table(
        "path",
        "workers",
        "in flight /worker",
        "origins",
        "samples/s",
        "decoded MiB/s",
        "fetched MiB/s",
        "ceiling MiB/s",
        "decoded /ceiling",
        "fetched /ceiling",
        "decoded MiB/s /worker",
        "loader CPU",
        "decoded MiB /CPU-s",
        "server CPU",
        "retries",
        title="loader (bench_loader, as `seis data bench`)",
    )
    for r in rows:
        per_worker = r.decoded_per_s / max(r.workers, 1)
        t.add_row(
            r.path,
            str(r.workers),
            str(r.concurrency),
            "aligned" if r.aligned else "random",
            f"{r.samples_per_s:.2f}",
            mib(r.decoded_per_s),
            mib(r.fetched_per_s),
            mib(r.ceiling_per_s),
            f"{r.ratio_decoded:.2f}",
            f"{r.ratio_fetched:.2f}",
            mib(per_worker),
            f"{r.loader_cpu:.2f}",
            mib(r.decoded_per_cpu_s),
            f"{r.server_cpu:.2f}",
            str(r.retries),
        )
    con.print(t)
    con.print(
        "best of the sweep (re-measured before and after each loader row): "
        + ", ".join(f"{p} {c}" for p, c in best.items()),
        highlight=False,
    )
    p = meta["projection"]
    con.print(
        f"read amplification (fetched stored bytes / (decoded bytes x compression)): random origins "
        f"{meta['amplification']:.2f}, aligned {meta['amplification_aligned']:.2f}\n"
        f"projection to a P5 node: {mib(p['decoded_per_cpu_s'])} MiB decoded per loader CPU-second (mean of the "
        f"worker rows) x {P5_LOADER_VCPUS} vCPUs = {p['node_gbps']:.1f} GB/s decoded (reference: "
        f"{REFERENCE_GBPS[0]:g}-{REFERENCE_GBPS[1]:g} GB/s per node), which needs {p['s3_gbps']:.1f} GB/s from S3 at "
        f"this geometry; assumes S3 and the NIC deliver that and a P5 vCPU decodes like one here",
        highlight=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small volumes, short windows, fewer settings (~1 min)")
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 384))
    ap.add_argument("--chunks", type=int, nargs=3, default=(64, 64, 64))
    ap.add_argument("--crop", type=int, nargs=3, default=(192, 192, 256))
    ap.add_argument("--seconds", type=float, default=8.0, help="measured window per setting")
    ap.add_argument("--latency-ms", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=64, help="the recipe's GETs in flight per worker")
    ap.add_argument("--low-concurrency", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", help="loader worker counts (default 0 1 2; quick: 0 2)")
    ap.add_argument("--sweep", type=int, nargs="+", help="GETs in flight for the ceiling (default 1 4 16 64)")
    ap.add_argument("--no-aligned", action="store_true", help="skip the data.align_crops rows")
    ap.add_argument("--json", help="write the results here as JSON")
    ap.add_argument("--server", choices=("seaweed", "moto"), default="seaweed")
    ap.add_argument("--shards", type=int, nargs=3, help="training layout: shards of this shape, --chunks inside")
    ap.add_argument("--compressor", default="zstd", help="as `seis data synth --compressor` (default zstd, MDIO's)")
    args = ap.parse_args()
    if args.quick:
        args.volumes, args.shape, args.crop, args.seconds = 2, (192, 192, 256), (128, 128, 192), 3.0
    for k, v in FAKE_AWS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    shape, chunks, crop = tuple(args.shape), tuple(args.chunks), tuple(args.crop)
    sweep = args.sweep or ((1, 16, 64) if args.quick else (1, 4, 16, 64))
    worker_counts = args.workers or ((0, 2) if args.quick else (0, 1, 2))

    with (
        servers(args.latency_ms, with_zero_proxy=not args.quick, kind=args.server) as started,
        tempfile.TemporaryDirectory() as tmp,
    ):
        os.environ.setdefault("SEIS_DATA_DIR", tmp)
        moto, proxies = started[0], started[1:]
        paths = [("direct", moto.endpoint, [moto])] + [(p.name, p.endpoint, [moto, p]) for p in proxies]
        shards = tuple(args.shards) if args.shards else None
        uris = write_volumes(moto.endpoint, args.volumes, shape, chunks, shards, args.compressor)  # type: ignore[arg-type]
        objects = chunk_keys(moto.endpoint)
        keys = [k for k, _ in objects]
        stored = sum(s for _, s in objects)
        raw = args.volumes * shape[0] * shape[1] * shape[2] * 4
        ceilings: list[Ceiling] = []
        for path, ep, on_path in paths:
            for client in CLIENTS:
                for n in sweep:
                    ceilings.append(ceiling(path, ep, on_path, keys, n, client, args.seconds / 2))
                    print(f"ceiling {path} {client} x{n}: {mib(ceilings[-1].bytes_per_s)} MiB/s", file=sys.stderr)
        best = {p: max((c for c in ceilings if c.path == p), key=lambda c: c.bytes_per_s) for p, _, _ in paths}
        rows: list[LoaderRow] = []
        for path, ep, on_path in paths:
            b = best[path]  # paired: the sweep's best client and concurrency, re-measured around every row
            settings = [(w, args.concurrency) for w in worker_counts] + [(1, args.low_concurrency)]
            for workers, conc in settings:
                # random origins, then aligned (recipe concurrency only): ceiling, row, ceiling, row, ceiling
                modes = [False] + ([True] if not args.no_aligned and conc == args.concurrency else [])
                before = ceiling(path, ep, on_path, keys, b.concurrency, b.client, args.seconds / 2).bytes_per_s
                for aligned in modes:
                    row = run_loader(
                        path,
                        ep,
                        on_path,
                        uris,
                        crop=crop,  # type: ignore[arg-type]
                        workers=workers,
                        concurrency=conc,
                        prefetch=args.prefetch,
                        seconds=args.seconds,
                        aligned=aligned,
                    )
                    after = ceiling(path, ep, on_path, keys, b.concurrency, b.client, args.seconds / 2).bytes_per_s
                    top = (before + after) / 2
                    row.ceiling_per_s, row.ratio_decoded, row.ratio_fetched = (
                        top,
                        row.decoded_per_s / top,
                        row.fetched_per_s / top,
                    )
                    rows.append(row)
                    before = after
                    print(
                        f"loader {path} w{workers} c{conc} {'aligned' if aligned else 'random'}: "
                        f"{mib(row.decoded_per_s)} MiB/s decoded, {row.ratio_decoded:.2f} of the ceiling",
                        file=sys.stderr,
                    )

    compression = stored / raw
    amp = [r.fetched_per_s / (r.decoded_per_s * compression) for r in rows if r.decoded_per_s > 0 and not r.aligned]
    amp_aligned = [r.fetched_per_s / (r.decoded_per_s * compression) for r in rows if r.decoded_per_s > 0 and r.aligned]
    # per-CPU rate of the worker processes (workers >= 1; else the in-process rows) at the recipe's concurrency
    at_recipe = [r for r in rows if r.concurrency == args.concurrency and not r.aligned]
    measured = [r.decoded_per_cpu_s for r in at_recipe if r.workers >= 1] or [r.decoded_per_cpu_s for r in at_recipe]
    per_cpu = sum(measured) / len(measured)
    meta: dict[str, Any] = {
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "volumes": args.volumes,
        "shape": "x".join(map(str, shape)),
        "chunks": "x".join(map(str, chunks)) + (f" in shards {'x'.join(map(str, shards))}" if shards else ""),
        "server": args.server,
        "compressor": args.compressor,
        "crop": "x".join(map(str, crop)),
        "chunk_objects": len(objects),
        "mean_chunk_bytes": stored / len(objects),
        "compression": compression,
        "amplification": sum(amp) / len(amp),
        "amplification_aligned": sum(amp_aligned) / len(amp_aligned) if amp_aligned else float("nan"),
        "ceiling": {p: f"{c.client} x{c.concurrency}: {mib(c.bytes_per_s)} MiB/s" for p, c in best.items()},
        "projection": {
            "decoded_per_cpu_s": per_cpu,
            "loader_vcpus": P5_LOADER_VCPUS,
            "node_gbps": per_cpu * P5_LOADER_VCPUS / 1e9,
            "s3_gbps": per_cpu * P5_LOADER_VCPUS / 1e9 * compression * sum(amp) / len(amp),
        },
    }
    print_report(meta, ceilings, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "ceilings": [asdict(c) for c in ceilings], "loader": [asdict(r) for r in rows]},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
