"""`seis show` (provenance and attempts of a run) and `seis rerun` (submit a run again)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from seiscli.launcher.cli.common import RunRef, RunsDir, Sets, app, err, fail, out, print_script, run_or_fail
from seiscli.recipe import RecipeError


@app.command()
def show(
    ref: RunRef,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output (all packages included).")] = False,
    packages: Annotated[bool, typer.Option("--packages", help="List every Python package of each attempt.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Provenance of a run (code commit and patch, image, versions and nodes as the job saw them) and its attempts."""
    from seiscli.launcher.runinfo import run_info
    from seiscli.launcher.runinfo import show as show_info

    run = run_or_fail(ref, runs_dir)
    from seiscli.launcher.jobs import SLURM_BACKENDS, current_statuses

    sub, _ = current_statuses([run])[run.path]  # the state, refreshed (one scheduler query)
    info = run_info(run, sub)
    if sub.get("backend") in SLURM_BACKENDS and any(a["end_time"] is None for a in info["attempts"]):
        from seiscli.launcher.backends.slurm import job_attempts

        # An attempt without its end line: the scheduler's record of it fills in.
        info = run_info(run, sub, scheduler=[a.to_json() for a in job_attempts(str(sub.get("job_id")))])
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    console = out if out.is_terminal else Console(file=out.file, width=max(out.width, 200), no_color=True)
    show_info(info, console, packages=packages)


@app.command()
def rerun(
    ref: RunRef,
    set_: Sets = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the script; submit and write nothing.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Local backend: start and return at once.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Submit a run again from its recorded resolved recipe (and, without --set, its recorded job script) into a
    new run directory that records `rerun_of`."""
    from seiscli.launcher.cli.common import overrides
    from seiscli.launcher.launch import execute, plan_launch, rerun_source

    try:
        recipe, source = rerun_source(ref, runs_dir, overrides(sets=set_))
        plan = plan_launch(recipe, runs_dir, rerun=source)
    except (LookupError, RecipeError) as e:
        fail(str(e))
    for note in plan.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if dry_run:
        print_script(plan.script)
        return
    raise typer.Exit(execute(plan, console=out, detach=detach))
