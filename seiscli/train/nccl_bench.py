"""All-reduce bus bandwidth within each node and over each node pair: the job `seis doctor --nccl` submits.

`python -m seiscli.train.nccl_bench PLAN.json`, one process per GPU (or per CPU process) on every node, started
by srun. The plan (written by seiscli/launcher/nccl_check.py) lists the nodes and the rounds: first every node
alone, then node pairs in round-robin order (n-1 rounds of n/2 disjoint pairs). Each group is a process group of
its own with its own TCPStore, so a node that cannot join fails only its own groups, and every task moves on to
the next round after at most `timeout_s`. Results: one JSON file per group under <out>/results/.

Fault knobs for testing the classification on a cluster whose nodes are all fine (honoured here, on the named
nodes only): SEIS_NCCL_CHECK_BREAK=node2[,..] points the collective backend at a network interface that does
not exist (GLOO/NCCL_SOCKET_IFNAME), as a node with a dead NIC; SEIS_NCCL_CHECK_SLOW=node2:0.2 holds each
timed all-reduce on that node back by 0.2 s, as a slow link or GPU would (the peers wait for it).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

BAD_IFNAME = "seis-broken0"


def _knobs(node: str) -> float:
    """Apply the fault knobs for this node; the delay (seconds) to add before each timed all-reduce."""
    if node in os.environ.get("SEIS_NCCL_CHECK_BREAK", "").split(","):
        os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = BAD_IFNAME
    for item in os.environ.get("SEIS_NCCL_CHECK_SLOW", "").split(","):
        name, _, delay = item.partition(":")
        if name == node:
            return float(delay or 0.2)
    return 0.0


def _wait_all(store: dist.TCPStore, key: str, count: int, timeout_s: float, *, wait: bool = True) -> None:
    """A barrier over the job-wide store that gives up after timeout_s (a dead node must not stall the rest)."""
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while wait and store.add(key, 0) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def measure(
    plan: dict[str, Any], group_nodes: list[str], node: str, local: int, port: int, delay: float
) -> dict[str, Any] | None:
    """This task's part of one group's all-reduce; the group's result from its rank 0, None from the others."""
    ppn = plan["procs_per_node"]
    world = len(group_nodes) * ppn
    grank = group_nodes.index(node) * ppn + local
    timeout = timedelta(seconds=plan["timeout_s"])
    store = dist.TCPStore(group_nodes[0], port, world, grank == 0, timeout=timeout)
    cuda = plan["device"] == "cuda"
    dist.init_process_group(plan["backend"], store=store, rank=grank, world_size=world, timeout=timeout)
    try:
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        x = torch.ones(plan["message_bytes"] // 4, dtype=torch.float32, device=device)
        for _ in range(plan["warmup"]):
            dist.all_reduce(x)
        dist.barrier()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(plan["iters"]):
            if delay:
                time.sleep(delay)
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize(device)
        dt = torch.tensor([(time.perf_counter() - t0) / plan["iters"]], dtype=torch.float64, device=device)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the group's time is its slowest member's
        seconds = float(dt.item())
    finally:
        dist.destroy_process_group()
    if grank != 0:
        return None
    algbw = plan["message_bytes"] / seconds / 1e9
    return {
        "nodes": group_nodes,
        "world": world,
        "seconds": seconds,
        "algbw_gbps": algbw,
        "busbw_gbps": algbw * 2 * (world - 1) / world,  # nccl-tests' bus bandwidth of all-reduce
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan = json.loads(Path(argv[0]).read_text())
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    local = int(os.environ.get("SLURM_LOCALID", "0"))
    procid = int(os.environ.get("SLURM_PROCID", "0"))
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    out = Path(plan["out"]) / "results"
    out.mkdir(parents=True, exist_ok=True)
    if plan["device"] == "cuda":
        torch.cuda.set_device(local)
    delay = _knobs(node)
    total = len(plan["nodes"]) * plan["procs_per_node"]
    base = plan["port_base"] + (job % plan["port_slots"]) * plan["ports_per_job"]
    # The job-wide store only paces the rounds; no collective runs over it.
    pace = dist.TCPStore(plan["nodes"][0], base, total, procid == 0, timeout=timedelta(seconds=plan["timeout_s"]))
    port = base + 1
    for k, rnd in enumerate(plan["rounds"]):
        for group in rnd["groups"]:
            if node in group:
                _one(plan, rnd["kind"], group, node, local, port, delay, out)
            port += 1
        _wait_all(pace, f"round-{k}", total, plan["timeout_s"])
    # The store lives in task 0: it leaves only once every task has left the last round.
    _wait_all(pace, "done", total, plan["timeout_s"], wait=procid == 0)
    return 0


def _one(
    plan: dict[str, Any], kind: str, group: list[str], node: str, local: int, port: int, delay: float, out: Path
) -> None:
    name = f"{kind}-{'-'.join(group)}"
    try:
        result = measure(plan, group, node, local, port, delay)
    except Exception as e:  # a node that cannot join or finish: recorded, and the next group goes on
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{name}: {node} local {local}: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        traceback.print_exc()
        rec = {"kind": kind, "nodes": group, "failed_on": node, "local": local, "error": f"{type(e).__name__}: {first}"}
        (out / f"fail-{name}-{node}-{local}.json").write_text(json.dumps(rec) + "\n")
        return
    if result is not None:
        (out / f"{name}.json").write_text(json.dumps({"kind": kind, **result}) + "\n")
        print(f"{name}: {result['busbw_gbps']:.3f} GB/s bus bandwidth", flush=True)


if __name__ == "__main__":
    sys.exit(main())
