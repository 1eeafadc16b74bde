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
Efficiency at n = (samples/s per GPU at n) / (samples/s per GPU at the smallest size that ran); the report
and its attribution are in sweep_report.py, the prediction in predict.py.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
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
