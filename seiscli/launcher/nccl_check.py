"""`seis doctor --nccl`: measure all-reduce bus bandwidth on the partition's idle nodes, blame the bad ones, and
write the exclude list that `seis launch --exclude-from FILE` turns into `#SBATCH --exclude=`.

The job (seiscli/train/nccl_bench.py, one process per GPU) measures each node alone and every node pair. A node
is judged against the cluster profile's baselines (nccl_check.intra_node_busbw_gbps / inter_node_busbw_gbps;
below slow_fraction of them is slow):
  failed   its own (intra-node) group failed, or it ran nothing, or every pair with a healthy partner failed
  slow     its intra-node bandwidth is low, or the median over its pairs with healthy partners is low
  suspect  only pairs with another suspect are low (two nodes: which of them cannot be told; not excluded)
  healthy  otherwise
Failed and slow nodes go to the exclude list, each with the action to take.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seiscli.launcher.profiles import ClusterProfile, ProfileError

PORT_BASE, PORT_RANGE = 30000, 30000
EXCLUDE_FILE = "exclude.txt"
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def round_robin(nodes: list[str]) -> list[list[list[str]]]:
    """n-1 rounds of disjoint pairs covering every pair once (the circle method); an odd node sits out a round."""
    ring: list[str | None] = list(nodes) + ([None] if len(nodes) % 2 else [])
    n = len(ring)
    rounds = []
    for _ in range(n - 1):
        pairs = [[ring[i], ring[n - 1 - i]] for i in range(n // 2)]
        rounds.append([[a, b] for a, b in pairs if a is not None and b is not None])
        ring = [ring[0], ring[-1], *ring[1:-1]]
    return [r for r in rounds if r]


def make_plan(profile: ClusterProfile, nodes: list[str], out: Path) -> dict[str, Any]:
    chk = profile.nccl_check
    gpus = profile.gpus_per_node
    rounds = [{"kind": "intra", "groups": [[n] for n in nodes]}]
    rounds += [{"kind": "pair", "groups": r} for r in round_robin(nodes)]
    ports = 1 + sum(len(r["groups"]) for r in rounds)
    return {
        "nodes": nodes,
        "procs_per_node": gpus or chk.procs_per_node,
        "backend": chk.backend or ("nccl" if gpus else "gloo"),
        "device": "cuda" if gpus else "cpu",
        "message_bytes": int(chk.message_mb * 2**20) // 4 * 4,
        "iters": chk.iters,
        "warmup": 2,
        "timeout_s": chk.timeout_s,
        "port_base": PORT_BASE,
        "ports_per_job": ports,
        "port_slots": max(1, PORT_RANGE // ports),
        "rounds": rounds,
        "out": str(out),
    }


def render_job(profile: ClusterProfile, plan: dict[str, Any], out: Path) -> str:
    """The batch script: one task per GPU (or CPU process) on each node, the profile's environment and image."""
    q = shlex.quote
    chk = profile.nccl_check
    lines = [
        "#!/bin/bash",
        "#SBATCH --job-name=seis-nccl-check",
        f"#SBATCH --nodes={len(plan['nodes'])}",
        f"#SBATCH --nodelist={','.join(plan['nodes'])}",
        f"#SBATCH --ntasks-per-node={plan['procs_per_node']}",
        f"#SBATCH --time={chk.time_limit}",
        f"#SBATCH --output={out}/slurm-%j.out",
    ]
    if profile.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={profile.gpus_per_node}")
    for key in ("partition", "account", "qos"):
        value = getattr(profile, key)
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [f"#SBATCH {x}" for x in profile.extra_sbatch or []]
    lines += ["set -euo pipefail", *(f"export {k}={q(v)}" for k, v in profile.env.items())]
    srun = ["srun", f"--output={q(str(out))}/rank-%t.log"]
    if profile.container_image:
        srun.append(f"--container-image={q(profile.container_image)}")
        if profile.container_mounts:
            srun.append(f"--container-mounts={q(','.join(profile.container_mounts))}")
    python = profile.python or "python3"
    lines.append(" ".join([*srun, q(python), "-m", "seiscli.train.nccl_bench", q(str(out / "plan.json"))]))
    return "\n".join(lines) + "\n"


def idle_nodes(partition: str | None) -> list[str]:
    from seiscli.launcher.backends.slurm import expand_hostlist, run_slurm

    res = run_slurm(["sinfo", "-h", "-t", "idle", "-o", "%N", *(["-p", partition] if partition else [])])
    if res.rc != 0:
        raise ProfileError(f"sinfo: {res.err.strip() or res.rc}")
    return sorted({n for line in res.out.split() for n in expand_hostlist(line)})


@dataclass
class NodeVerdict:
    node: str
    status: str  # healthy | slow | failed | suspect
    intra_busbw_gbps: float | None
    pair_busbw_gbps: float | None  # median over its pairs with healthy partners
    reason: str = ""
    action: str = ""


@dataclass
class CheckResult:
    job_id: str
    nodes: list[str]
    baseline: dict[str, float | None]
    verdicts: list[NodeVerdict]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    exclude_file: str | None = None

    @property
    def excluded(self) -> list[str]:
        return [v.node for v in self.verdicts if v.status in ("failed", "slow")]

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"excluded": self.excluded}


def read_results(
    out: Path,
) -> tuple[dict[tuple[str, ...], dict[str, Any]], dict[tuple[str, ...], list[dict[str, Any]]]]:
    """Measured groups and failed groups (with what each member said), keyed by (kind, *nodes)."""
    ok: dict[tuple[str, ...], dict[str, Any]] = {}
    bad: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for p in sorted((out / "results").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        key = (rec["kind"], *rec["nodes"])
        if p.name.startswith("fail-"):
            bad.setdefault(key, []).append(rec)
        else:
            ok[key] = rec
    return ok, bad


def classify(profile: ClusterProfile, nodes: list[str], out: Path, job_id: str) -> CheckResult:
    chk = profile.nccl_check
    intra_min = chk.slow_fraction * (chk.intra_node_busbw_gbps or 0)
    inter_min = chk.slow_fraction * (chk.inter_node_busbw_gbps or 0)
    ok, bad = read_results(out)
    verdicts: dict[str, NodeVerdict] = {}
    for n in nodes:
        rec = ok.get(("intra", n))
        bw = rec["busbw_gbps"] if rec else None
        if rec is None:
            said = [r["error"] for r in bad.get(("intra", n), [])]
            why = f"intra-node all-reduce failed: {said[0]}" if said else "ran nothing (no result from this node)"
            verdicts[n] = NodeVerdict(n, "failed", None, None, why)
        elif rec["world"] > 1 and bw < intra_min:  # one process per node: nothing to measure inside it
            verdicts[n] = NodeVerdict(n, "slow", bw, None, f"intra-node {bw:.3g} GB/s < {intra_min:.3g}")
        else:
            verdicts[n] = NodeVerdict(n, "healthy", bw, None)
    pairs = []
    for a_i, a in enumerate(nodes):
        for b in nodes[a_i + 1 :]:
            rec = ok.get(("pair", a, b)) or ok.get(("pair", b, a))
            errs = bad.get(("pair", a, b), []) + bad.get(("pair", b, a), [])
            pairs.append(
                {
                    "nodes": [a, b],
                    "busbw_gbps": rec["busbw_gbps"] if rec else None,
                    "error": None if rec else (errs[0]["error"] if errs else "no result"),
                }
            )
    # Pairs judge a node only against partners that are fine on their own.
    for n in nodes:
        v = verdicts[n]
        if v.status != "healthy" and v.status != "slow":
            continue
        mine = [p for p in pairs if n in p["nodes"]]
        judged = [p for p in mine if verdicts[next(x for x in p["nodes"] if x != n)].status == "healthy"]
        if not judged:
            continue
        values = [p["busbw_gbps"] or 0.0 for p in judged]
        v.pair_busbw_gbps = statistics.median(values)
        if all(p["busbw_gbps"] is None for p in judged):
            v.status, v.reason = "failed", f"every pair with a healthy node failed: {judged[0]['error']}"
        elif v.pair_busbw_gbps < inter_min and v.status == "healthy":
            # With only healthy partners, a low pair blames both ends equally; n is slow if it is low against
            # most of them, suspect if the only partners are themselves suspects of the same pairs.
            v.status = "suspect" if len(judged) == 1 else "slow"
            v.reason = f"inter-node median {v.pair_busbw_gbps:.3g} GB/s < {inter_min:.3g} over {len(judged)} pair(s)"
    for v in verdicts.values():
        v.action = _action(v, profile)
    return CheckResult(
        job_id=job_id,
        nodes=nodes,
        baseline={
            "intra_node_busbw_gbps": chk.intra_node_busbw_gbps,
            "inter_node_busbw_gbps": chk.inter_node_busbw_gbps,
            "slow_fraction": chk.slow_fraction,
        },
        verdicts=[verdicts[n] for n in nodes],
        pairs=pairs,
    )


def _action(v: NodeVerdict, profile: ClusterProfile) -> str:
    hyperpod = profile.type == "hyperpod-slurm"
    if v.status == "failed":
        if hyperpod:
            return f"replace it: scontrol update node={v.node} state=fail reason='seis doctor --nccl: failed'"
        return f"drain it and check the NIC/driver: scontrol update nodename={v.node} state=drain reason='nccl check'"
    if v.status == "slow":
        check = "nvidia-smi -q (clocks, NVLink), fi_info -p efa" if profile.gpus_per_node else "load, NIC"
        return f"excluded; check {check}, then run seis doctor --nccl again"
    if v.status == "suspect":
        return "cannot tell which end of the pair is slow: run again with a third node (--nodelist)"
    return ""


def write_exclude(path: Path, result: CheckResult) -> None:
    lines = [f"# seis doctor --nccl, job {result.job_id}, {time.strftime('%Y-%m-%d %H:%M:%S')}: failed and slow nodes"]
    lines += [f"{v.node}  # {v.status}: {v.reason}" for v in result.verdicts if v.node in result.excluded]
    path.write_text("\n".join(lines) + "\n")


def read_exclude(path: Path) -> list[str]:
    """Node names from an exclude list: one per line, `#` starts a comment; a bad name is a RecipeError (exit 2)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"--exclude-from {path}: {e.strerror}") from None
    names = []
    for i, line in enumerate(text.splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not _NODE_NAME.match(name):
            raise ProfileError(f"--exclude-from {path}:{i}: {name!r} is not a node name (letters, digits, . _ -)")
        names.append(name)
    return names


def submit_and_wait(
    profile: ClusterProfile, nodes: list[str], out: Path, *, wait_s: float, echo: Any = None
) -> tuple[str, str]:
    """Write plan and script under `out`, sbatch it, and wait for the job to end: (job id, final state)."""
    from seiscli.launcher.backends.slurm import query_jobs, run_slurm

    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(profile, nodes, out)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    script = out / "nccl-check.sbatch"
    script.write_text(render_job(profile, plan, out))
    res = run_slurm(["sbatch", "--parsable", str(script)], cwd=out, timeout=60)
    if res.rc != 0:
        raise RuntimeError(f"sbatch: {res.err.strip() or res.out.strip() or res.rc}")
    job = res.out.strip().split(";")[0]
    if echo:
        echo(f"submitted job {job} over {','.join(nodes)}; results in {out}")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            st = query_jobs([job]).get(job)
            if st is not None and st.state.finished:
                return job, st.state.value
            if time.monotonic() > deadline:
                run_slurm(["scancel", job])
                return job, "TIMEOUT (seis gave up waiting)"
            time.sleep(2)
    except KeyboardInterrupt:
        run_slurm(["scancel", job])
        raise


def check_nodes_arg(text: str) -> list[str]:
    from seiscli.launcher.backends.slurm import expand_hostlist

    nodes = expand_hostlist(text)
    bad = [n for n in nodes if not _NODE_NAME.match(n)]
    if not nodes or bad:
        raise ProfileError(f"--nodelist {text!r}: give node names, e.g. node1,node2 or node[1-4]")
    return nodes


def print_result(result: CheckResult, console: Any) -> None:
    from rich.table import Table

    colour = {"healthy": "green", "suspect": "yellow", "slow": "yellow", "failed": "bold red"}
    table = Table("node", "", "intra GB/s", "pairs GB/s", "why", "action")
    for v in result.verdicts:
        table.add_row(
            v.node,
            f"[{colour[v.status]}]{v.status}[/]",
            "-" if v.intra_busbw_gbps is None else f"{v.intra_busbw_gbps:.3g}",
            "-" if v.pair_busbw_gbps is None else f"{v.pair_busbw_gbps:.3g}",
            v.reason,
            v.action,
        )
    console.print(table)
    b = result.baseline
    console.print(
        f"baseline (profile): intra {b['intra_node_busbw_gbps']} GB/s, inter {b['inter_node_busbw_gbps']} GB/s, "
        f"slow below {b['slow_fraction']:.0%}",
        highlight=False,
    )
    if result.exclude_file:
        n = len(result.excluded)
        console.print(
            f"exclude list ({n} node(s)): {result.exclude_file}  ->  seis launch --exclude-from FILE",
            highlight=False,
            soft_wrap=True,
        )


def exit_code(result: CheckResult) -> int:
    return 1 if result.excluded else 0
