"""The pretrain recipe on one GPU from S3 (SeaweedFS on the same machine), against an in-memory batch.

    # here (needs multidimio): the volume's MDIO skeleton, amplitude chunks left out (they are made there)
    python benchmarks/gpu_s3_pretrain.py skeleton DIR [--shape 768 768 1152]
    # on the GPU machine (weed on PATH, the skeleton carried):
    python benchmarks/gpu_s3_pretrain.py run --skeleton DIR --out OUT [--steps 55] [--before PATH]

`run`: (1) starts SeaweedFS (seiscli.data.seaweed, plain HTTP on 127.0.0.1); (2) fills the skeleton's amplitude
with `synthetic_volume` (what `seis data synth` writes: float32, lz4, 128^3 chunks, statsV1 with histogram) and
uploads every object; (3) checks on the device that the loader's normalised crops equal today's host-normalised
ones bit for bit; (4) loader CPU per delivered GB before (`--before`: an older seiscli checkout) and after,
at full loader speed (benchmarks/bench_loader_cpu.py); (5) the in-memory reference (benchmarks/bench_gpu.py,
a pinned random batch); (6) `python -m seiscli.train` on the pretrain recipe from s3:// for --steps steps,
sampling /proc every second (whole machine, the trainer process, its loader processes, the S3 server).
Prints a short table; everything goes to OUT/gpu_s3_pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "seis-gpu"
KEY = "volumes/synth.mdio"
CHUNKS = (128, 128, 128)


def skeleton(directory: Path, shape: tuple[int, int, int]) -> None:
    """write_volume on a zero volume (compresses to nothing), then the amplitude chunks are dropped."""
    import shutil

    import numpy as np

    from seiscli.data.write import write_volume

    path = directory / "synth.mdio"
    write_volume(str(path), np.broadcast_to(np.float32(0), shape), chunks=CHUNKS, compressor="lz4", overwrite=True)
    shutil.rmtree(path / "amplitude" / "c")


def fill(path: Path, shape: tuple[int, int, int], seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import zarr

    from seiscli.data.synth import synthetic_volume
    from seiscli.data.write import _stats_accumulator

    t0 = time.perf_counter()
    data = synthetic_volume(shape, seed)
    t1 = time.perf_counter()
    mask = np.ones(shape[:2], dtype=bool)
    array = zarr.open_group(str(path), mode="r+")["amplitude"]
    acc = _stats_accumulator(data, mask, CHUNKS[0])
    for z0 in range(0, shape[0], CHUNKS[0]):
        slab = data[z0 : z0 + CHUNKS[0]]
        acc.update(slab.reshape(-1, shape[2]))
        array[z0 : z0 + CHUNKS[0]] = slab
    array.attrs["statsV1"] = json.dumps(acc.result().to_stats_v1())
    return {"generate_s": t1 - t0, "write_s": time.perf_counter() - t1}


def upload(path: Path, endpoint: str, env: dict[str, str]) -> dict[str, Any]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        endpoint=endpoint,
        region="us-east-1",
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )
    files = [p for p in path.rglob("*") if p.is_file()]
    t0 = time.perf_counter()

    def put(p: Path) -> int:
        data = p.read_bytes()
        obstore.put(store, f"{KEY}/{p.relative_to(path)}", data)
        return len(data)

    with ThreadPoolExecutor(16) as pool:
        nbytes = sum(pool.map(put, files))
    return {"objects": len(files), "bytes": nbytes, "upload_s": time.perf_counter() - t0}


def proc_cpu() -> dict[int, tuple[int, float, str]]:
    """pid -> (ppid, CPU seconds, comm) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        f = raw.rsplit(")", 1)[1].split()
        out[int(name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, comm)
    return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (user+nice+system+irq+softirq+steal) from /proc/stat."""
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    v = [int(x) for x in f]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


class Sampler(threading.Thread):
    """Every second: machine busy CPU, the trainer's own CPU, its descendants' (loader) CPU, weed's CPU."""

    def __init__(self, trainer: int, server: int) -> None:
        super().__init__(daemon=True)
        self.trainer, self.server = trainer, server
        self.rows: list[dict[str, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            procs = proc_cpu()
            kids: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in procs.items():
                kids.setdefault(ppid, []).append(pid)
            loader, stack = 0.0, list(kids.get(self.trainer, []))
            while stack:
                pid = stack.pop()
                loader += procs[pid][1]
                stack.extend(kids.get(pid, []))
            server, stack = procs.get(self.server, (0, 0.0, ""))[1], list(kids.get(self.server, []))
            while stack:
                pid = stack.pop()
                server += procs[pid][1]
                stack.extend(kids.get(pid, []))
            self.rows.append(
                {
                    "time": time.time(),
                    "machine": machine_busy(),
                    "trainer": procs.get(self.trainer, (0, 0.0, ""))[1],
                    "loader": loader,
                    "server": server,
                }
            )
            self.done.wait(1.0)


def window(rows: list[dict[str, float]], t0: float, t1: float) -> dict[str, float]:
    """CPU cores (CPU s per wall s) of each column between the samples nearest t0 and t1."""
    a = min(rows, key=lambda r: abs(r["time"] - t0))
    b = min(rows, key=lambda r: abs(r["time"] - t1))
    dt = b["time"] - a["time"]
    return {k: (b[k] - a[k]) / dt for k in ("machine", "trainer", "loader", "server")} | {"window_s": dt}


def sh(cmd: list[str], env: dict[str, str], timeout: float, log: Path) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode


def run(args: argparse.Namespace) -> None:
    import torch

    from seiscli.data.seaweed import SeaweedS3

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps}
    res["device"] = torch.cuda.get_device_name(0)
    res["cpus"] = os.cpu_count()

    def save() -> None:
        (out / "gpu_s3_pretrain.json").write_text(json.dumps(res, indent=1) + "\n")

    t = time.perf_counter()
    server = SeaweedS3("/tmp/seis-gpu-s3")
    res["server_start_s"] = time.perf_counter() - t
    server.create_bucket(BUCKET)
    env = {**os.environ, **server.env(), "PYTHONUNBUFFERED": "1"}
    uri = f"s3://{BUCKET}/{KEY}"
    try:
        vol = Path(args.skeleton) / "synth.mdio"
        res["volume"] = {"shape": args.shape, "chunks": CHUNKS, "compressor": "lz4"} | fill(vol, tuple(args.shape))
        res["volume"] |= upload(vol, server.http_endpoint, server.env())
        print("volume", res["volume"], flush=True)
        save()
        py = sys.executable
        # (3) the device normalisation against today's host normalisation, on S3 crops (smaller crop: fast)
        code = (
            "import torch, sys; from seiscli.data.loader_bench import bench_recipe; "
            "from seiscli.train.data import build_loader; "
            f"r = bench_recipe([{uri!r}], crop=(256, 256, 512), workers=2, endpoint_url={server.endpoint!r}); "
            "ld = build_loader(r, dp_rank=0, dp_size=1, device=torch.device('cuda')); "
            "got = [b.cpu() for _, b in zip(range(6), ld)]; ld.close(); "
            "want = [ld.dataset[p][0] for p in range(6)]; "
            "ok = all(torch.equal(g, w) for g, w in zip(got, want)); "
            "print('EQUAL' if ok else 'DIFFERENT', max(float((g - w).abs().max()) for g, w in zip(got, want)))"
        )
        p = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        res["device_normalisation"] = (p.stdout.strip().splitlines() or [""])[-1] or p.stderr[-500:]
        print("device normalisation:", res["device_normalisation"], flush=True)
        save()
        # (4) loader CPU per delivered GB, before and after
        res["loader_cpu"] = []
        for label, path in (("before", args.before), ("after", str(ROOT))):
            if not path or not args.loader_batches:
                continue
            j = out / f"loader_cpu_{label}.json"
            bench = [py, str(ROOT / "benchmarks" / "bench_loader_cpu.py"), "--uri", uri, "--endpoint",
                     server.endpoint, "--workers", "8", "--prefetch", "2", "--batches", str(args.loader_batches),
                     "--label", label, "--json", str(j)]  # fmt: skip
            rc = sh(bench, env | {"PYTHONPATH": f"{path}:{env.get('PYTHONPATH', '')}"}, 240, out / f"{label}.log")
            res["loader_cpu"].append(json.loads(j.read_text()) if j.exists() else {"code": label, "rc": rc})
            print("loader cpu", res["loader_cpu"][-1], flush=True)
            save()
        # (5) in-memory reference
        j = out / "inmem.json"
        if args.inmem_from:  # measured earlier on this kind of machine (bench_gpu.py's JSON)
            j = Path(args.inmem_from)
            rc = 0
        else:
            rc = sh([py, str(ROOT / "benchmarks" / "bench_gpu.py"), "--variants", "auto/none/1", "--steps",
                     str(args.inmem_steps), "--warmup", "3", "--out", str(j)], env, 200, out / "inmem.log")  # fmt: skip
        res["inmem"] = json.loads(j.read_text())["rows"][0] if j.exists() else {"rc": rc}
        print("in-memory", {k: res["inmem"].get(k) for k in ("step_time_s", "mfu")}, flush=True)
        save()
        # (6) training from S3
        from seiscli.recipe import load_recipe

        recipe = load_recipe(
            "pretrain",
            {
                "cluster.backend": "local",
                "cluster.nodes": 1,
                "cluster.gpus_per_node": 1,
                "parallelism.strategy": "ddp",
                "data.uris": [uri],
                "data.endpoint_url": server.endpoint,
                "train.steps": args.steps,
                "checkpoint.interval": 0,
                "logging.interval": 5,
            },
        )
        rpath, run_dir = out / "recipe.yaml", Path("/tmp/seis-gpu-run")
        rpath.write_text(recipe.to_yaml())
        t0 = time.time()
        with open(out / "train.log", "w") as log:
            proc = subprocess.Popen([py, "-m", "seiscli.train", str(rpath), "--run-dir", str(run_dir)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
            sampler = Sampler(proc.pid, server.pid)
            sampler.start()
            try:
                proc.wait(timeout=args.train_timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=60)
            sampler.done.set()
            sampler.join()
        res["train_rc"] = proc.returncode
        res["train_wall_s"] = time.time() - t0
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] if (
            run_dir / "metrics.jsonl").exists() else []  # fmt: skip
        res["train_steps"] = [
            {k: m.get(k) for k in ("step", "step_time_s", "data_wait_s", "mfu", "time")} for m in metrics
        ]
        res["cpu_samples"] = sampler.rows
        if len(metrics) >= 12:
            steady = metrics[10:]
            times = [m["step_time_s"] for m in metrics[1:]]
            med = statistics.median(times)
            res["summary"] = {
                "median_step_s": med,
                "median_step_steps_11_end_s": statistics.median(m["step_time_s"] for m in steady),
                "inmem_step_s": res["inmem"].get("step_time_s"),
                "ratio_to_inmem": med / res["inmem"]["step_time_s"] if "step_time_s" in res["inmem"] else None,
                "steps_2_10_over_median": [m["step_time_s"] / med for m in metrics[1:10]],
                "step1_s": metrics[0]["step_time_s"],
                "step1_data_wait_s": metrics[0]["data_wait_s"],
                "data_wait_share": sum(m["data_wait_s"] for m in metrics[1:]) / sum(times),
                "mfu_median": statistics.median(m["mfu"] for m in metrics[1:] if "mfu" in m),
                "cpu_steady": window(sampler.rows, steady[0]["time"] - steady[0]["step_time_s"], steady[-1]["time"]),
                "samples_per_s": 1 / med,
            }
        save()
    finally:
        server.stop()
        save()
    table(res)


def table(res: dict[str, Any]) -> None:
    print("\n| what | value |\n|---|---|")
    s = res.get("summary", {})
    for k, v in s.items():
        if isinstance(v, list):
            v = " ".join(f"{x:.3f}" for x in v)
        elif isinstance(v, dict):
            v = " ".join(f"{a}={b:.2f}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        print(f"| {k} | {v} |")
    print(f"| device normalisation | {res.get('device_normalisation')} |")
    for r in res.get("loader_cpu", []):
        if "core_s_per_gb" in r:
            print(
                f"| loader {r['code']} | {r['samples_per_s']:.3f} samples/s, {r['core_s_per_gb']:.3f} core-s/GB "
                f"(workers {r['workers_core_s_per_gb']:.3f}, main {r['main_core_s_per_gb']:.3f}), "
                f"{r['cores_at_gpu_rate']:.2f} cores at 0.58 samples/s, first batch {r['first_batch_s']:.1f} s |"
            )
        else:
            print(f"| loader {r.get('code')} | failed rc={r.get('rc')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sk = sub.add_parser("skeleton")
    sk.add_argument("dir", type=Path)
    r = sub.add_parser("run")
    r.add_argument("--skeleton", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--before", help="an older seiscli checkout, for the loader CPU before/after")
    r.add_argument("--steps", type=int, default=55)
    r.add_argument("--inmem-steps", type=int, default=12)
    r.add_argument("--inmem-from", help="bench_gpu.py JSON of an earlier in-memory run, instead of running it")
    r.add_argument("--loader-batches", type=int, default=12)
    r.add_argument("--train-timeout", type=float, default=280)
    for p in (sk, r):
        p.add_argument("--shape", type=int, nargs=3, default=[768, 768, 1152])
    args = ap.parse_args()
    if args.what == "skeleton":
        skeleton(args.dir, tuple(args.shape))
    else:
        run(args)


if __name__ == "__main__":
    main()
