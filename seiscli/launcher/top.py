"""`seis top RUN`: a live view of a running job, read from the files the trainer writes (no torch here).

Each refresh reads the tails of metrics.jsonl and rank_times.jsonl (never whole files: a 5-day run logs
millions of lines), ranks.json (the node of every rank), the newest checkpoint's manifest time, and asks the
scheduler once for the job's state. It ends when the job does.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from seiscli.launcher.runs import Run

WINDOW = 20  # recent steps averaged for the rates shown
TAIL_BYTES = 1 << 18
RANKS_FILE, RANK_TIMES_FILE = "ranks.json", "rank_times.jsonl"
SLOWEST = 5


def tail_records(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The complete JSON lines in the last `max_bytes` of a file."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            lines = f.read().splitlines()
    except OSError:
        return []
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line is cut
    recs = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line still being written
        if isinstance(rec, dict):
            recs.append(rec)
    return recs


@dataclass
class NodeTime:
    node: str
    ranks: int
    mean_s: float
    max_s: float


@dataclass
class Snapshot:
    run: str
    state: str
    job_id: str | None = None
    step: int | None = None
    steps_planned: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    mfu: float | None = None
    data_wait_fraction: float | None = None
    step_time_s: float | None = None
    straggler_ratio: float | None = None
    last_step_age_s: float | None = None
    checkpoint_step: int | None = None
    checkpoint_age_s: float | None = None
    nodes: list[NodeTime] = field(default_factory=list)
    slowest: list[dict[str, Any]] = field(default_factory=list)  # rank, node, mean_s, vs_median

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _recipe_bits(run: Run) -> tuple[int | None, Path]:
    """train.steps and the checkpoint directory, from the run's recipe.yaml (YAML only, no pydantic)."""
    import yaml

    try:
        data = yaml.safe_load(run.recipe_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        data = {}
    steps = (data.get("train") or {}).get("steps")
    ckpt = (data.get("checkpoint") or {}).get("dir")
    return steps, Path(ckpt) if ckpt else run.path / "checkpoints"


def _checkpoint(root: Path) -> tuple[int | None, float | None]:
    """The newest complete checkpoint's step and the time its manifest was written (checkpoint_layout)."""
    from seiscli.checkpoint_layout import MANIFEST, step_dirs

    for step, path in reversed(step_dirs(root)):
        try:
            return step, (path / MANIFEST).stat().st_mtime
        except OSError:
            continue  # no manifest yet: still being written, or broken
    return None, None


def snapshot(run: Run, state: str, job_id: str | None = None, now: float | None = None) -> Snapshot:
    now = time.time() if now is None else now
    snap = Snapshot(run=run.id, state=state, job_id=job_id)
    snap.steps_planned, ckpt_root = _recipe_bits(run)
    recent = [r for r in tail_records(run.metrics_path) if "step" in r][-WINDOW:]
    if recent:
        last = recent[-1]
        snap.step, snap.loss = last.get("step"), last.get("loss")
        snap.samples_per_s = _mean([r["samples_per_s"] for r in recent if "samples_per_s" in r])
        snap.mfu = _mean([r["mfu"] for r in recent if "mfu" in r])
        snap.step_time_s = _mean([r["step_time_s"] for r in recent if "step_time_s" in r])
        waits = sum(r.get("data_wait_s", 0.0) for r in recent)
        total = sum(r.get("step_time_s", 0.0) for r in recent)
        snap.data_wait_fraction = waits / total if total else None
        snap.straggler_ratio = _mean([r["straggler_ratio"] for r in recent if "straggler_ratio" in r])
        if "time" in last:
            snap.last_step_age_s = max(0.0, now - last["time"])
    step, written = _checkpoint(ckpt_root)
    snap.checkpoint_step = step
    snap.checkpoint_age_s = max(0.0, now - written) if written else None
    _rank_view(run, snap)
    return snap


def _rank_view(run: Run, snap: Snapshot) -> None:
    """Per-node step time and the slowest ranks, over the recent lines of rank_times.jsonl."""
    try:
        nodes = json.loads((run.path / RANKS_FILE).read_text()).get("nodes") or []
    except (OSError, json.JSONDecodeError):
        nodes = []
    lines = [r["step_time_s"] for r in tail_records(run.path / RANK_TIMES_FILE, 1 << 20) if "step_time_s" in r]
    lines = [t for t in lines[-WINDOW:] if len(t) == len(lines[-1])] if lines else []
    if not lines:
        return
    world = len(lines[-1])
    per_rank = [statistics.fmean(t[k] for t in lines) for k in range(world)]
    median = statistics.median(per_rank) or 1e-12
    node_of = [nodes[k] if k < len(nodes) and nodes[k] else "?" for k in range(world)]
    by_node: dict[str, list[float]] = {}
    for k, t in enumerate(per_rank):
        by_node.setdefault(node_of[k], []).append(t)
    snap.nodes = [NodeTime(n, len(ts), statistics.fmean(ts), max(ts)) for n, ts in sorted(by_node.items())]
    order = sorted(range(world), key=lambda k: per_rank[k], reverse=True)[:SLOWEST]
    snap.slowest = [
        {"rank": k, "node": node_of[k], "mean_s": per_rank[k], "vs_median": per_rank[k] / median} for k in order
    ]


# -- drawing -----------------------------------------------------------------------------------------------


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render(snap: Snapshot) -> Group:
    head = Text.assemble(
        (snap.run, "bold"),
        f"  job {snap.job_id or '-'}  ",
        (snap.state, "green" if snap.state == "RUNNING" else "yellow"),
    )
    steps = f"{snap.step if snap.step is not None else '-'}/{snap.steps_planned or '?'}"
    main = Table.grid(padding=(0, 2))
    main.add_row("step", steps, "loss", _num(snap.loss, ".4f"), "last step", f"{_age(snap.last_step_age_s)} ago")
    main.add_row(
        "samples/s",
        _num(snap.samples_per_s, ".2f"),
        "MFU",
        _num(snap.mfu, ".1%"),
        "data wait",
        _num(snap.data_wait_fraction, ".1%"),
    )
    ckpt = f"step {snap.checkpoint_step}, {_age(snap.checkpoint_age_s)} ago" if snap.checkpoint_step else "none yet"
    main.add_row(
        "step time", f"{_num(snap.step_time_s, '.3f')} s", "straggler", _num(snap.straggler_ratio, ".2f"), "ckpt", ckpt
    )
    parts: list[Any] = [head, main]
    if snap.nodes:
        nodes = Table(
            "node", "ranks", "mean step s", "max step s", title="per node (recent steps)", title_justify="left"
        )
        for n in snap.nodes:
            nodes.add_row(n.node, str(n.ranks), f"{n.mean_s:.3f}", f"{n.max_s:.3f}")
        slow = Table("rank", "node", "step s", "x median", title="slowest ranks", title_justify="left")
        for r in snap.slowest:
            slow.add_row(str(r["rank"]), r["node"], f"{r['mean_s']:.3f}", f"{r['vs_median']:.2f}")
        parts += [nodes, slow]
    else:
        parts.append(Text("no per-rank step times yet (rank_times.jsonl)", style="dim"))
    return Group(*parts)


def watch(run: Run, console: Console, *, once: bool, interval_s: float = 2.0) -> int:
    """Refresh until the job ends (or once); 0 when the job ended COMPLETED or --once, else 1."""
    from rich.live import Live

    from seiscli.launcher.jobs import current_statuses

    def look() -> tuple[Snapshot, bool, bool]:
        sub, st = current_statuses([run])[run.path]
        snap = snapshot(run, st.state.value, sub.get("job_id"))
        return snap, st.state.finished, st.state.value == "COMPLETED"

    snap, done, ok = look()
    if once or done:
        console.print(render(snap))
        return 0 if once or ok else 1
    with Live(render(snap), console=console, refresh_per_second=4, transient=False) as live:
        while not done:
            time.sleep(interval_s)
            snap, done, ok = look()
            live.update(render(snap))
    return 0 if ok else 1
