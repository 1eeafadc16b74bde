"""From a resolved recipe to a submitted job and a run directory.

`plan_launch` does everything that can fail on bad input (fitting, rendering) before anything is
written; `execute` then creates the run directory, submits, and (local backend) follows the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from seiscli.checkpoint_layout import find_latest, incompatibility, recipe_changes, resolve_dir
from seiscli.launcher.render import render_script
from seiscli.launcher.runs import Run, create_run, find_run, runs_root, step_records
from seiscli.recipe import Recipe, RecipeError, load_recipe

SCRIPT_NAME = {
    "local": "launch.sh",
    "slurm": "job.sbatch",
    "hyperpod-slurm": "job.sbatch",
    "hyperpod-eks": "job.yaml",  # a HyperPodPyTorchJob manifest
}


@dataclass(frozen=True)
class ResumeSource:
    """`seis launch --resume RUN`: the run continued and its newest complete checkpoint."""

    run_id: str
    checkpoint_dir: Path
    checkpoint: Path
    step: int
    manifest: dict[str, Any]


def resume_source(ref: str, root: str | Path | None = None) -> ResumeSource:
    """RUN's checkpoint directory and newest complete checkpoint; LookupError says what is missing."""
    run = find_run(ref, root)
    if not run.recipe_path.is_file():
        raise LookupError(f"run {run.id} has no recipe.yaml; cannot tell where its checkpoints are")
    ckpt_dir = resolve_dir(load_recipe(str(run.recipe_path)), run.path).resolve()
    found = find_latest(ckpt_dir)
    if found is None:
        raise LookupError(f"run {run.id} has no complete checkpoint in {ckpt_dir}; nothing to resume from")
    return ResumeSource(run.id, ckpt_dir, found.path, found.step, found.manifest)


@dataclass(frozen=True)
class RerunSource:
    """`seis rerun RUN`: the run submitted again, and its job script when it is reused as it was."""

    run_id: str
    run_path: Path
    script: str | None  # the recorded script (None: rendered again, because overrides changed the recipe)


def rerun_source(ref: str, root: str | Path | None, overrides: dict[str, Any]) -> tuple[Recipe, RerunSource]:
    """RUN's recorded resolved recipe with `overrides` on top, and its recorded script when there are none."""
    run = find_run(ref, root)
    if not run.recipe_path.is_file():
        raise LookupError(f"run {run.id} has no recipe.yaml to submit again")
    recipe = load_recipe(str(run.recipe_path), overrides)
    script_name = run.submission().get("script") or SCRIPT_NAME.get(recipe.cluster.backend, "")
    script_path = run.path / script_name
    script = script_path.read_text() if not overrides and script_path.is_file() else None
    return recipe, RerunSource(run.id, run.path, script)


@dataclass
class LaunchPlan:
    recipe: Recipe
    script: str
    root: Path
    recipe_source: Path | None = None
    notes: list[str] = field(default_factory=list)
    resume: ResumeSource | None = None
    rerun: RerunSource | None = None

    @property
    def backend(self) -> str:
        return self.recipe.cluster.backend


def plan_launch(
    recipe: Recipe,
    root: str | Path | None = None,
    *,
    recipe_source: Path | None = None,
    resume: ResumeSource | None = None,
    rerun: RerunSource | None = None,
) -> LaunchPlan:
    notes: list[str] = []
    if resume is not None:
        # The trainer resumes from recipe.checkpoint.dir; the caller points it at the resumed run's.
        if recipe.checkpoint.dir is None or Path(recipe.checkpoint.dir).resolve() != resume.checkpoint_dir:
            raise RecipeError(f"--resume {resume.run_id}: checkpoint.dir must be {resume.checkpoint_dir}")
        problem = incompatibility(resume.manifest, recipe)
        if problem:
            raise RecipeError(f"--resume {resume.run_id}: cannot resume from {resume.checkpoint}: {problem}")
        notes.append(f"resuming {resume.run_id} from {resume.checkpoint} (step {resume.step})")
        changes = recipe_changes(resume.manifest, recipe)
        if changes:
            notes.append("the recipe differs from the one that saved it; from there on: " + "; ".join(changes))
    if recipe.cluster.backend == "local":
        from seiscli.launcher.backends.local import fit_to_machine

        recipe, changes = fit_to_machine(recipe)
        if changes:
            notes.append("fitted to this machine: " + ", ".join(changes))
    base = runs_root(root)
    # The real directory gets its timestamp at creation; render against a placeholder of the same shape
    # so that a dry run shows exactly what will be submitted.
    placeholder = base / recipe.name / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    script = render_script(recipe, placeholder)
    if rerun is not None and rerun.script is not None:
        script = rerun.script.replace(str(rerun.run_path), str(placeholder))
        notes.append(f"rerun of {rerun.run_id}: its recorded job script, in a new run directory")
    elif rerun is not None:
        notes.append(f"rerun of {rerun.run_id}: its recorded recipe with the overrides; job script rendered again")
    return LaunchPlan(
        recipe=recipe, script=script, root=base, recipe_source=recipe_source, notes=notes, resume=resume, rerun=rerun
    )


def write_run(plan: LaunchPlan) -> Run:
    from seiscli.launcher.provenance import write_launch_provenance

    run = create_run(plan.recipe, plan.root, recipe_source=plan.recipe_source)
    script = run.path / SCRIPT_NAME[plan.backend]
    if plan.rerun is not None and plan.rerun.script is not None:
        # The script as it ran before (templates may have changed since), pointed at the new run directory.
        script.write_text(plan.rerun.script.replace(str(plan.rerun.run_path), str(run.path)))
    else:
        script.write_text(render_script(plan.recipe, run.path))
    script.chmod(0o755)
    prov = write_launch_provenance(run.path, plan.recipe)
    git = prov["git"]
    run.update_submission(backend=plan.backend, script=script.name, code_commit=git.get("commit"))
    if git.get("dirty"):
        run.update_submission(code_dirty=True)
    if plan.rerun is not None:
        run.update_submission(rerun_of=plan.rerun.run_id, rerun_script_reused=plan.rerun.script is not None)
    if plan.resume is not None:
        r = plan.resume
        run.update_submission(resumed_from=r.run_id, resume_checkpoint=str(r.checkpoint), resume_step=r.step)
    return run


def execute(plan: LaunchPlan, *, console: Console, detach: bool = False) -> int:
    """Create the run, submit it, and return the exit code for the CLI."""
    from seiscli.launcher.backends import get_backend
    from seiscli.launcher.backends.base import JobState, SubmitError

    run = write_run(plan)
    backend = get_backend(plan.backend)
    try:
        job_id = backend.submit(run)
    except SubmitError as e:
        run.update_submission(state=JobState.SUBMIT_FAILED.value, error=str(e))
        console.print(f"[bold red]submission failed:[/] {e}\nrun directory kept for inspection: {run.path}")
        return 1
    console.print(f"run [bold]{run.id}[/]  job {job_id}  ({plan.backend})\n  {run.path}", highlight=False)
    if plan.recipe.logging.tensorboard is not False:
        console.print(f"  tensorboard --logdir {run.path / 'tensorboard'}", highlight=False)
    sub = run.submission()
    if sub.get("code_dirty"):
        console.print(
            f"  code {str(sub.get('code_commit'))[:12]} with uncommitted changes: recorded in provenance/git.patch",
            highlight=False,
        )
    if plan.backend != "local" or detach:
        return 0
    from seiscli.launcher.backends.local import LocalBackend

    assert isinstance(backend, LocalBackend)
    return follow_local(run, backend, plan.recipe, console)


def follow_local(run: Run, backend: Any, recipe: Recipe, console: Console) -> int:
    """A progress bar fed by metrics.jsonl while the local run trains; a summary at the end."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[sps]} samples/s"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(recipe.name, total=recipe.train.steps, loss="-", sps="-")
    tail = _MetricsTail(run.metrics_path)

    def tick() -> None:
        for rec in tail.read_new():
            progress.update(
                task,
                completed=rec["step"],
                loss=f"{rec.get('loss', float('nan')):.4f}",
                sps=f"{rec.get('samples_per_s', 0):.1f}",
            )

    try:
        with progress:
            code = backend.wait(run, on_tick=tick)
    except KeyboardInterrupt:
        console.print(f"[yellow]stopped[/]; logs and checkpoints kept in {run.path}")
        return 130
    summary = run.summary()
    if code == 0:
        shown = {
            k: summary[k] for k in ("steps", "final_loss", "samples_per_s", "world_size", "wall_s") if k in summary
        }
        console.print(f"[green]completed[/] {json.dumps(shown)}", highlight=False)
    else:
        console.print(f"[red]failed[/] (exit {code}); see {run.logs_dir / 'job.out'}")
        _print_tail(run.logs_dir / "job.out", console)
    return code


class _MetricsTail:
    """Reads the lines appended to a JSONL file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except OSError:
            return []
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        return step_records(lines)


def _print_tail(path: Path, console: Console, lines: int = 15) -> None:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    for line in text:
        console.print(f"  {line}", highlight=False, markup=False)
