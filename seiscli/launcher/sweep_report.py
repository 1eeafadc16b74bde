"""The report of a scaling sweep: per size, throughput, efficiency and where the lost efficiency went.

Reads what the job script and the trainer wrote into each size's run directory (sweep_exit, metrics.jsonl
with the per-step phase times of seiscli/train/attribution.py, collectives.json) and the plan (sweep.json).
Writes a CSV and a PNG; the CLI prints the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seiscli.launcher.runs import Run
from seiscli.launcher.sweep import EXIT_FILE, SWEEP_FILE

# Attribution parts in report order; `other` is the median rank's time that no phase covers.
PARTS = ("compute", "comm", "optimizer", "data", "straggler", "other")
NAMED_PARTS = PARTS[:-1]
ATTRIBUTION_TOLERANCE = 0.05  # the named parts must explain the lost efficiency to 5 points


@dataclass
class Point:
    nodes: int
    procs: int
    run: str
    state: str
    reason: str | None = None
    steps: int = 0  # timed steps found
    global_batch: int = 0
    step_time_s: float | None = None  # mean over the timed steps
    samples_per_s: float | None = None
    efficiency: float | None = None
    time_s: dict[str, float] = field(default_factory=dict)  # mean seconds per part (PARTS)
    lost: dict[str, float] = field(default_factory=dict)  # lost efficiency per part, and "total"
    comm_split: bool | None = None
    busbw_gb_s: dict[str, float] = field(default_factory=dict)  # all_reduce / all_gather
    predicted_step_s: float | None = None
    predicted_efficiency: float | None = None

    @property
    def attribution_error(self) -> float | None:
        """|named parts - measured lost efficiency|: how much the phases leave unexplained."""
        if "total" not in self.lost:
            return None
        return abs(sum(self.lost[p] for p in NAMED_PARTS) - self.lost["total"])


def _size_state(run: Run, job_state: str) -> tuple[str, str | None]:
    """A size's state from the exit status the job script wrote, else from the sweep job's state."""
    try:
        rc = int((run.path / EXIT_FILE).read_text().strip())
    except (OSError, ValueError):
        rc = None
    if rc == 0:
        return "COMPLETED", None
    if rc is not None:
        from seiscli.launcher.jobs import error_line

        summary = run.summary()
        if summary.get("status") == "completed" and summary.get("steps") == summary.get("steps_planned"):
            # Every step ran and rank 0 wrote its summary: the measurement stands; say how the step ended.
            return "COMPLETED", f"all {summary.get('steps')} steps done, but the job step then exited {rc}"
        return "FAILED", f"exit {rc}: {error_line(run) or 'no error line in its logs'}"
    if job_state in ("PENDING", "REQUEUED", "CREATED"):
        return "PENDING", None
    if job_state == "RUNNING":
        return ("RUNNING" if run.metrics_path.exists() else "WAITING"), None
    return "NOT RUN", f"the sweep job ended ({job_state}) before this size finished"


def load_points(sweep_dir: Path, *, refresh: bool = True) -> tuple[dict[str, Any], list[Point]]:
    """The sweep record and a point per size, with throughput, attribution and collective bandwidth."""
    from seiscli.launcher.runs import find_run

    doc = json.loads((sweep_dir / SWEEP_FILE).read_text())
    sweep = Run(sweep_dir)
    job_state = sweep.submission().get("state", "UNKNOWN")
    if refresh and sweep.submission().get("job_id"):
        from seiscli.launcher.jobs import current_statuses

        job_state = current_statuses([sweep])[sweep.path][1].state.value
    root = sweep_dir.parent.parent.parent
    warmup = int(doc.get("warmup_steps", 0))
    points = []
    # Sizes as planned (the run's recipe.yaml may be what made it fail: the plan is read, not the recipe).
    planned = {int(s["nodes"]): s for s in doc.get("sizes", [])}
    for n_text, run_id in sorted(doc["runs"].items(), key=lambda kv: int(kv[0])):
        run = find_run(run_id, root)
        size = planned.get(int(n_text), {})
        state, reason = _size_state(run, job_state)
        if state in ("COMPLETED", "FAILED") and run.submission().get("state") != state:
            run.update_submission(state=state, reason=reason)  # what `seis status` shows for this size
        p = Point(
            int(n_text), int(size.get("procs", 0)), run.id, state, reason, global_batch=int(size.get("global_batch", 0))
        )
        timed = [r for r in run.metrics() if r["step"] > warmup and isinstance(r.get("time_s"), dict)]
        if timed and state == "COMPLETED":
            p.steps = len(timed)
            p.step_time_s = sum(r["step_time_s"] for r in timed) / len(timed)
            p.samples_per_s = p.global_batch / p.step_time_s
            p.time_s = {k: sum(r["time_s"].get(k, 0.0) for r in timed) / len(timed) for k in PARTS}
            p.comm_split = all(r.get("comm_split") for r in timed)
        try:
            coll = json.loads((run.path / "collectives.json").read_text())
            p.busbw_gb_s = {k: coll[k]["busbw_gb_s"] for k in ("all_reduce", "all_gather") if k in coll}
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
        points.append(p)
    attribute(points, doc.get("mode", "weak"))
    return doc, points


def attribute(points: list[Point], mode: str) -> list[Point]:
    """Efficiency and its loss per part, relative to the smallest size that ran.

    With r = 1 (weak) or procs_base / procs_n (strong: a rank's ideal time shrinks with the world), a part's
    loss is (t_n - r t_base) / T_n, and the parts sum to 1 - efficiency because the parts of a step sum to its
    time (attribution.py). The named parts (all but `other`) must come within ATTRIBUTION_TOLERANCE of it."""
    base = next((p for p in points if p.samples_per_s), None)
    if base is None:
        return points
    per_proc = base.samples_per_s / base.procs  # type: ignore[operator]
    for p in points:
        if not p.samples_per_s or not p.step_time_s:
            continue
        p.efficiency = (p.samples_per_s / p.procs) / per_proc
        r = 1.0 if mode == "weak" else base.procs / p.procs
        p.lost = {k: (p.time_s[k] - r * base.time_s[k]) / p.step_time_s for k in PARTS}
        p.lost["total"] = 1.0 - p.efficiency
    return points


def add_predictions(points: list[Point], strategy: str, params: int, blocks: int) -> None:
    """Predicted step time per size from the alpha-beta model (seiscli/launcher/predict.py), fed with what the
    sweep measured: the smallest size's time outside communication, and each size's own bus bandwidth."""
    from seiscli.launcher.predict import Measured, ModelSizes, predict_step

    base = next((p for p in points if p.step_time_s), None)
    if base is None or strategy not in ("ddp", "zero1", "zero2", "zero3", "fsdp2"):
        return
    sizes = ModelSizes(params=params, blocks=blocks, train_flops_per_sample=0.0)

    def net(p: Point) -> Measured | None:
        bw = p.busbw_gb_s
        if "all_reduce" not in bw:
            return None
        return Measured(bw["all_reduce"] * 1e9, bw.get("all_gather", bw["all_reduce"]) * 1e9)

    base_net = net(base)
    if base_net is None:
        return
    procs_per_node = base.procs // base.nodes
    pred_base = predict_step(strategy, sizes, 1.0, base.nodes, procs_per_node, base_net)
    # The base's time outside communication (its measured step less its modelled exposed comm) is the compute.
    compute = max(base.step_time_s - pred_base.exposed_s, 1e-9)  # type: ignore[operator]
    first = predict_step(strategy, sizes, compute, base.nodes, procs_per_node, base_net).step_s
    for p in points:
        m = net(p)
        if m is None:
            continue
        p.predicted_step_s = predict_step(strategy, sizes, compute, p.nodes, procs_per_node, m).step_s
        p.predicted_efficiency = first / p.predicted_step_s


CSV_COLUMNS = (
    "nodes",
    "procs",
    "state",
    "steps",
    "global_batch",
    "step_time_s",
    "samples_per_s",
    "efficiency",
    "predicted_step_s",
    "predicted_efficiency",
    *(f"t_{k}" for k in PARTS),
    "lost_total",
    *(f"lost_{k}" for k in PARTS),
    "attribution_error",
    "comm_split",
    "allreduce_busbw_gb_s",
    "allgather_busbw_gb_s",
    "run",
    "reason",
)


def report_rows(points: list[Point]) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        row: dict[str, Any] = {
            "nodes": p.nodes,
            "procs": p.procs,
            "state": p.state,
            "steps": p.steps,
            "global_batch": p.global_batch,
            "step_time_s": p.step_time_s,
            "samples_per_s": p.samples_per_s,
            "efficiency": p.efficiency,
            "predicted_step_s": p.predicted_step_s,
            "predicted_efficiency": p.predicted_efficiency,
            **{f"t_{k}": p.time_s.get(k) for k in PARTS},
            "lost_total": p.lost.get("total"),
            **{f"lost_{k}": p.lost.get(k) for k in PARTS},
            "attribution_error": p.attribution_error,
            "comm_split": p.comm_split,
            "allreduce_busbw_gb_s": p.busbw_gb_s.get("all_reduce"),
            "allgather_busbw_gb_s": p.busbw_gb_s.get("all_gather"),
            "run": p.run,
            "reason": p.reason,
        }
        rows.append(row)
    return rows


def write_csv(points: list[Point], path: Path) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in report_rows(points):
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def write_png(points: list[Point], path: Path, title: str) -> Path:
    """Left: efficiency vs nodes against ideal (and the prediction); right: where each size's step time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [p for p in points if p.efficiency is not None]
    nodes = [p.nodes for p in points]
    left.plot(nodes, [1.0] * len(nodes), "--", color="#999", label="ideal")
    if ok:
        left.plot([p.nodes for p in ok], [p.efficiency for p in ok], "o-", color="#1f77b4", label="measured")
    pred = [p for p in points if p.predicted_efficiency is not None]
    if pred:
        left.plot([p.nodes for p in pred], [p.predicted_efficiency for p in pred], "x:", color="#d62728",
                  label="predicted")  # fmt: skip
    for p in points:
        if p.efficiency is None:
            left.annotate(p.state, (p.nodes, 0.05), ha="center", color="#d62728")
    left.set_xscale("log", base=2)
    left.set_xticks(nodes, [str(n) for n in nodes])
    left.set_ylim(0, 1.15)
    left.set_xlabel("nodes")
    left.set_ylabel("scaling efficiency")
    left.legend(loc="lower left")
    colors = {"compute": "#1f77b4", "comm": "#ff7f0e", "optimizer": "#2ca02c", "data": "#9467bd",
              "straggler": "#d62728", "other": "#bbbbbb"}  # fmt: skip
    labels = [str(p.nodes) for p in points]
    bottom = [0.0] * len(points)
    for k in PARTS:
        vals = [max(0.0, p.time_s.get(k, 0.0)) for p in points]
        right.bar(labels, vals, bottom=bottom, color=colors[k], label=k)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, p in enumerate(points):
        if not p.time_s:
            right.annotate(p.state, (i, 0), ha="center", va="bottom", color="#d62728")
    right.set_xlabel("nodes")
    right.set_ylabel("seconds per step (mean of timed steps)")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
