"""What TLS costs the S3 data path: the same GETs over HTTP and HTTPS from one SeaweedFS server (self-signed
private CA, seiscli.data.seaweed), CPU-seconds per GB on the client and on the server, and throughput.

    python benchmarks/bench_tls.py [--objects 24] [--size-mib 8] [--concurrency 16] [--seconds 6] [--rounds 2]

Clients: obstore (the loader's; rustls) and plain threads (urllib3 on presigned URLs; Python's ssl, OpenSSL).
Client CPU is this process's user+system time (getrusage: every thread, tokio's included); server CPU is the weed
process's (/proc). Rounds alternate HTTP and HTTPS so that drifting load on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

BUCKET = "tls-bench"
GB = 1e9


def cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_pid(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def obstore_gets(endpoint: str, keys: list[str], concurrency: int, seconds: float) -> int:
    import obstore

    from seiscli.data.store import _obstore_s3  # the loader's client configuration (AWS_CA_BUNDLE honoured)

    store = _obstore_s3(f"s3://{BUCKET}", {"endpoint_url": endpoint})
    rng = random.Random(0)

    async def run() -> int:
        total = 0
        deadline = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal total
            while time.perf_counter() < deadline:
                r = await obstore.get_async(store, rng.choice(keys))
                total += len(await r.bytes_async())

        await asyncio.gather(*(one() for _ in range(concurrency)))
        return total

    return asyncio.run(run())


def thread_gets(endpoint: str, keys: list[str], concurrency: int, seconds: float, ca: str | None) -> int:
    import boto3
    import urllib3

    s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca)
    urls = [s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": k}) for k in keys]
    http = urllib3.PoolManager(maxsize=concurrency, retries=False, ca_certs=ca)
    deadline = time.perf_counter() + seconds

    def one(seed: int) -> int:
        rng, total = random.Random(seed), 0
        while time.perf_counter() < deadline:
            r = http.request("GET", rng.choice(urls))
            if r.status != 200:
                raise RuntimeError(f"GET answered {r.status}")
            total += len(r.data)
        return total

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, range(concurrency)))


def measure(server: Any, endpoint: str, client: str, keys: list[str], args: Any) -> dict[str, float]:
    ca = str(server.ca_file) if endpoint.startswith("https") else None
    c0, s0, t0 = cpu_self(), cpu_pid(server.pid), time.perf_counter()
    if client == "obstore":
        n = obstore_gets(endpoint, keys, args.concurrency, args.seconds)
    else:
        n = thread_gets(endpoint, keys, args.concurrency, args.seconds, ca)
    dt = time.perf_counter() - t0
    return {"bytes": n, "s": dt, "client_cpu": cpu_self() - c0, "server_cpu": cpu_pid(server.pid) - s0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=24)
    ap.add_argument("--size-mib", type=float, default=8.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from seiscli.data.seaweed import SeaweedS3

    server = SeaweedS3(tls=True)
    os.environ.update(
        AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key, AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true", AWS_CA_BUNDLE=str(server.ca_file),
    )  # fmt: skip
    try:
        server.create_bucket(BUCKET)
        c = server.client()
        payload = os.urandom(int(args.size_mib * 2**20))  # incompressible: TLS cost does not depend on content
        keys = [f"obj/{i:04d}" for i in range(args.objects)]
        for k in keys:
            c.put_object(Bucket=BUCKET, Key=k, Body=payload)
        totals: dict[tuple[str, str], dict[str, float]] = {}
        for r in range(args.rounds):
            order = [("http", server.http_endpoint), ("https", server.endpoint)]
            for scheme, ep in order if r % 2 == 0 else order[::-1]:
                for client in ("obstore", "threads"):
                    m = measure(server, ep, client, keys, args)
                    acc = totals.setdefault((client, scheme), dict.fromkeys(m, 0.0))
                    for key, value in m.items():
                        acc[key] += value
                    print(f"round {r + 1} {client} {scheme}: {m['bytes'] / m['s'] / 2**20:.0f} MiB/s", flush=True)
        print(f"\n{args.objects} objects of {args.size_mib:g} MiB, {args.concurrency} GETs in flight, "
              f"{args.rounds} x {args.seconds:g} s per setting, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")  # fmt: skip
        print("| client | scheme | MiB/s | client CPU-s/GB | server CPU-s/GB | total CPU-s/GB |")
        print("|---|---|---|---|---|---|")
        for (client, scheme), m in sorted(totals.items()):
            gb = m["bytes"] / GB
            cl, sv = m["client_cpu"] / gb, m["server_cpu"] / gb
            print(f"| {client} | {scheme} | {m['bytes'] / m['s'] / 2**20:.0f} | {cl:.2f} | {sv:.2f} | {cl + sv:.2f} |")
        for client in ("obstore", "threads"):
            h, s = totals[(client, "http")], totals[(client, "https")]
            dcl = s["client_cpu"] / (s["bytes"] / GB) - h["client_cpu"] / (h["bytes"] / GB)
            dsv = s["server_cpu"] / (s["bytes"] / GB) - h["server_cpu"] / (h["bytes"] / GB)
            ratio = (s["bytes"] / s["s"]) / (h["bytes"] / h["s"])
            print(f"TLS cost, {client}: client +{dcl:.2f} CPU-s/GB, server +{dsv:.2f} CPU-s/GB, "
                  f"throughput x{ratio:.2f} of HTTP")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
