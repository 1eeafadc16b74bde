"""Scaling sweeps: short measuring runs of one recipe on 1, 2, 4, ... nodes, all in one allocation.

Plan: a run directory per size (`<name>-n<N>`, recipe with `train.steps = warm-up + timed`, checkpoints off)
and one job script (templates/sweep.sbatch.j2) that allocates the largest size and runs the sizes one after
another as `srun -N n` job steps. One allocation rather than a job per size (or a dependency chain): every
size runs on the same machines (machine-to-machine spread, 7 % on the H200s of BENCHMARKS.md, is as large as
the effects measured), the sweep queues once instead of once per size, and a hung or failed size ends its
own step (srun --time) and not the sweep. The price: the largest size's nodes are held while the smaller
sizes run, which the dry run shows as node-hours allocated against used.

Modes: weak (default; each GPU keeps its micro-batch and accumulation, the global batch grows with the
world) and strong (the global batch of the largest size is kept; smaller sizes accumulate more).
Efficiency at n = (samples/s per GPU at n) / (samples/s per GPU at the smallest size that ran).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seiscli.launcher.runs import Run, create_run, iter_runs, runs_root
from seiscli.recipe import Recipe, RecipeError, validate

SWEEPS_DIR = "_sweeps"
SWEEP_FILE = "sweep.json"
SCRIPT = "job.sbatch"
EXIT_FILE = "sweep_exit"  # written by the job script after each size's step
MODES = ("weak", "strong")
DEFAULT_WARMUP, DEFAULT_TIMED = 10, 30
# Per-size start-up before the first step (imports, rendezvous, loader workers, first-step compilation): the
# H200 loader run of BENCHMARKS.md spent ~55 s before its second step.
STARTUP_S = {"gpu": 180.0, "cpu": 60.0}
CPU_FLOPS_PER_PROC = 2e9  # an assumed rate for a CPU recipe's estimate when nothing was measured
SAFETY = 3.0  # per-size step limit = start-up + SAFETY x the estimated steps
# Attribution parts in report order; `other` is the median rank's time that no phase covers.
PARTS = ("compute", "comm", "optimizer", "data", "straggler", "other")
NAMED_PARTS = PARTS[:-1]
ATTRIBUTION_TOLERANCE = 0.05  # the named parts must explain the lost efficiency to 5 points


def parse_nodes(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--nodes {text!r}: expected a comma-separated list of node counts, e.g. 1,2,4,8,16") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--nodes {text!r}: node counts must be >= 1")
    return counts


def sweep_recipes(
    recipe: Recipe, counts: list[int], *, mode: str = "weak", steps: int | None = None, warmup: int = DEFAULT_WARMUP
) -> list[Recipe]:
    """One short-run recipe per node count, named `<name>-n<count>`; all validated before anything is written."""
    if recipe.cluster.backend not in ("slurm", "hyperpod-slurm"):
        raise ValueError(
            f"field 'cluster.backend': a scaling sweep runs job steps inside one Slurm allocation; allowed: slurm, "
            f"hyperpod-slurm (got {recipe.cluster.backend!r})"
        )
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: allowed {', '.join(MODES)}")
    timed = DEFAULT_TIMED if steps is None else steps
    if timed < 1 or warmup < 0:
        raise ValueError(f"--steps {timed}: the timed steps must be >= 1 (and --warmup >= 0, got {warmup})")
    t = recipe.train
    largest = max(counts) * recipe.cluster.procs_per_node // recipe.parallelism.cp
    global_batch = t.micro_batch * t.grad_accum * largest
    out = []
    for n in counts:
        data = recipe.model_dump(mode="json")
        data["name"] = f"{recipe.name}-n{n}"
        data["cluster"]["nodes"] = n
        data["cluster"]["requeue"] = False  # a requeued size would run again after the sizes behind it
        data["train"]["steps"] = warmup + timed
        data["train"]["global_batch"] = None
        data["checkpoint"]["interval"] = 0
        if mode == "strong":
            dp = n * recipe.cluster.procs_per_node // recipe.parallelism.cp
            accum, rest = divmod(global_batch, t.micro_batch * dp)
            if rest:
                raise ValueError(
                    f"--mode strong: the global batch {global_batch} (micro_batch {t.micro_batch} x grad_accum "
                    f"{t.grad_accum} x {largest} data-parallel ranks at {max(counts)} nodes) does not split over "
                    f"{dp} ranks at {n} node(s); allowed: node counts whose ranks divide it"
                )
            data["train"]["grad_accum"] = accum
        try:
            out.append(validate(data))
        except RecipeError as e:
            raise ValueError(f"{n} node(s): {e}") from None
    return out


# -- plan ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    recipe: Recipe
    step_s: float  # estimated
    minutes: int  # this size's step limit

    @property
    def nodes(self) -> int:
        return self.recipe.cluster.nodes

    @property
    def steps(self) -> int:
        return self.recipe.train.steps

    @property
    def est_s(self) -> float:
        kind = "gpu" if self.recipe.cluster.gpus_per_node else "cpu"
        return STARTUP_S[kind] + self.steps * self.step_s


@dataclass(frozen=True)
class SweepPlan:
    name: str
    mode: str
    warmup: int
    timed: int
    sizes: list[Size]
    step_s: float  # the estimate at the smallest size
    step_source: str

    @property
    def max_nodes(self) -> int:
        return self.sizes[-1].nodes

    @property
    def limit_minutes(self) -> int:
        return sum(s.minutes for s in self.sizes) + 2

    @property
    def node_hours_used(self) -> float:
        return sum(s.nodes * s.est_s for s in self.sizes) / 3600

    @property
    def node_hours_allocated(self) -> float:
        return self.max_nodes * sum(s.est_s for s in self.sizes) / 3600

    @property
    def node_hours_limit(self) -> float:
        return self.max_nodes * self.limit_minutes / 60

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "warmup_steps": self.warmup,
            "timed_steps": self.timed,
            "step_time_estimate_s": self.step_s,
            "step_time_source": self.step_source,
            "time_limit_minutes": self.limit_minutes,
            "node_hours": {
                "used_est": self.node_hours_used,
                "allocated_est": self.node_hours_allocated,
                "at_time_limit": self.node_hours_limit,
            },
            "sizes": [
                {
                    "nodes": s.nodes,
                    "procs": s.recipe.cluster.world_size,
                    "global_batch": s.recipe.global_batch,
                    "grad_accum": s.recipe.train.grad_accum,
                    "steps": s.steps,
                    "step_time_est_s": s.step_s,
                    "run_est_s": s.est_s,
                    "step_limit_minutes": s.minutes,
                }
                for s in self.sizes
            ],
        }


def measured_step_time(recipe: Recipe, root: str | Path | None) -> tuple[float, str] | None:
    """Seconds per step of `recipe` from the newest finished run of the same model and strategy (this name or a
    past sweep's `<name>-n<N>`), scaled by samples per rank: per-GPU throughput carries over between sizes."""
    base = recipe.name.rsplit("-n", 1)[0] if re.search(r"-n\d+$", recipe.name) else recipe.name
    for run in iter_runs(root):
        if run.name != base and not re.fullmatch(re.escape(base) + r"-n\d+", run.name):
            continue
        summary = run.summary()
        sps, world = summary.get("samples_per_s"), summary.get("world_size")
        if not (isinstance(sps, (int, float)) and sps > 0 and isinstance(world, int) and world > 0):
            continue
        if summary.get("strategy") not in (None, recipe.parallelism.strategy):
            continue
        per_rank = recipe.train.micro_batch * recipe.train.grad_accum
        return per_rank / (sps / world), f"measured: run {run.id}"
    return None


def estimated_step_time(recipe: Recipe) -> tuple[float, str]:
    """No measurement: model FLOPs at the pretrain recipe's measured H200 MFU, or an assumed CPU rate."""
    from seiscli.launcher.predict import PRETRAIN_MFU, gpu_compute_s, model_sizes

    if recipe.cluster.gpus_per_node:
        return gpu_compute_s(recipe), f"estimate: model FLOPs at {PRETRAIN_MFU:.1%} MFU of an H200 (BENCHMARKS.md)"
    flops = model_sizes(recipe).train_flops_per_sample * recipe.train.micro_batch * recipe.train.grad_accum
    return flops / CPU_FLOPS_PER_PROC, f"estimate: model FLOPs at an assumed {CPU_FLOPS_PER_PROC / 1e9:g} GFLOP/s"


def plan_sweep(
    recipe: Recipe,
    counts: list[int],
    *,
    mode: str = "weak",
    steps: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    step_time: float | None = None,
    root: str | Path | None = None,
) -> SweepPlan:
    recipes = sweep_recipes(recipe, counts, mode=mode, steps=steps, warmup=warmup)
    first = recipes[0]
    if step_time is not None:
        if step_time <= 0:
            raise ValueError(f"--step-time {step_time}: must be > 0 seconds")
        est, source = step_time, "given: --step-time"
    else:
        est, source = measured_step_time(first, root) or estimated_step_time(first)
    sizes = []
    for r in recipes:
        # Weak scaling keeps each rank's work; strong scaling divides it (the ideal: no communication).
        s = est * (r.train.grad_accum / first.train.grad_accum)
        kind = "gpu" if r.cluster.gpus_per_node else "cpu"
        minutes = max(2, math.ceil((STARTUP_S[kind] + SAFETY * r.train.steps * s) / 60))
        sizes.append(Size(r, s, minutes))
    return SweepPlan(recipe.name, mode, warmup, recipes[0].train.steps - warmup, sizes, est, source)


# -- submission ---------------------------------------------------------------------------------------------------


def render_sweep(plan: SweepPlan, sweep_dir: Path, run_dirs: list[Path]) -> str:
    from seiscli.launcher.render import check_no_secrets, render_template

    top = plan.sizes[-1].recipe
    check_no_secrets(top)
    if re.search(r"\s", str(sweep_dir)):
        raise RecipeError(f"sweep directory {str(sweep_dir)!r} contains white space, which #SBATCH paths cannot hold")
    hours, minutes = divmod(plan.limit_minutes, 60)
    return render_template(
        "sweep.sbatch.j2",
        name=plan.name,
        c=top.cluster,
        mode=plan.mode,
        time_limit=f"{hours:02d}:{minutes:02d}:00",
        logs_dir=str(sweep_dir / "logs"),
        sizes=[
            {"nodes": s.nodes, "run_dir": str(d), "minutes": s.minutes}
            for s, d in zip(plan.sizes, run_dirs, strict=True)
        ],
    )


def sweep_dir_for(name: str, root: str | Path | None) -> Path:
    """`<runs>/_sweeps/<name>/<timestamp>`: two levels down, so that `seis status` (which lists
    `<runs>/*/*/submission.json`) does not take a sweep's job for a run."""
    base = runs_root(root) / SWEEPS_DIR / name
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    return path


def write_sweep(plan: SweepPlan, root: str | Path | None, recipe_source: Path | None = None) -> tuple[Run, list[Run]]:
    """The run directories, the sweep directory with sweep.json and its job script; nothing submitted yet."""
    runs = [create_run(s.recipe, root, recipe_source=recipe_source) for s in plan.sizes]
    path = sweep_dir_for(plan.name, root)
    (path / "logs").mkdir(parents=True)
    sweep = Run(path)
    (path / SCRIPT).write_text(render_sweep(plan, path, [r.path for r in runs]))
    ids = {str(s.nodes): r.id for s, r in zip(plan.sizes, runs, strict=True)}
    doc = plan.to_json() | {"created": time.time(), "runs": ids}
    (path / SWEEP_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    backend = plan.sizes[-1].recipe.cluster.backend
    sweep.update_submission(name=plan.name, backend=backend, script=SCRIPT)
    for r in runs:
        # A size's own outcome is its sweep_exit file; `seis sweep-report` stores it back as the run's state.
        r.update_submission(backend=backend, sweep=str(path), state="CREATED")
    return sweep, runs


def find_sweep(ref: str, root: str | Path | None) -> Path:
    """A sweep directory by path, `<name>/<timestamp>`, or name (its newest sweep)."""
    p = Path(ref)
    if (p / SWEEP_FILE).is_file():
        return p.resolve()
    base = runs_root(root) / SWEEPS_DIR
    if (base / ref / SWEEP_FILE).is_file():
        return base / ref
    found = sorted((base / ref).glob(f"*/{SWEEP_FILE}")) if (base / ref).is_dir() else []
    if not found:
        raise LookupError(f"no sweep {ref!r} under {base} (give a sweep name, <name>/<timestamp> or a directory)")
    return found[-1].parent


# -- report -------------------------------------------------------------------------------------------------------


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


def read_metrics(run: Run) -> list[dict[str, Any]]:
    try:
        lines = run.metrics_path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


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
        timed = [r for r in read_metrics(run) if r["step"] > warmup and isinstance(r.get("time_s"), dict)]
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
