"""`seis scale-sweep` and `seis sweep-report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from seiscli.launcher.cli.common import (
    CP,
    RunsDir,
    Sets,
    Steps,
    StrategyOpt,
    ZeroStage,
    app,
    fail,
    out,
    resolve,
)
from seiscli.recipe import RecipeError, find_recipe


@app.command("scale-sweep")
def scale_sweep(
    recipe: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    nodes: Annotated[str, typer.Option("--nodes", "-N", help="Node counts, comma-separated.")] = "1,2,4,8,16",
    strategy: StrategyOpt = None,
    zero_stage: ZeroStage = None,
    cp: CP = None,
    steps: Steps = None,
    set_: Sets = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and render every size; submit nothing.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Launch the same recipe on several node counts; `seis sweep-report` gives the efficiency."""
    from seiscli.launcher.launch import plan_launch, write_run
    from seiscli.launcher.sweep import parse_nodes, record_sweep, sweep_recipes

    base = resolve(recipe, strategy=strategy, zero_stage=zero_stage, cp=cp, steps=steps, sets=set_)
    try:
        counts = parse_nodes(nodes)
        plans = [plan_launch(r, runs_dir, recipe_source=find_recipe(recipe)) for r in sweep_recipes(base, counts)]
    except (ValueError, RecipeError) as e:
        fail(str(e))
    if dry_run:
        for n, plan in zip(counts, plans, strict=True):
            out.print(
                f"[bold]{n} node(s)[/]: {plan.recipe.cluster.world_size} processes, global batch "
                f"{plan.recipe.global_batch}",
                highlight=False,
            )
        return
    from seiscli.launcher.backends import get_backend
    from seiscli.launcher.backends.base import SubmitError

    runs = []
    for n, plan in zip(counts, plans, strict=True):
        run = write_run(plan)
        try:
            job = get_backend(plan.backend).submit(run)
        except SubmitError as e:
            run.update_submission(state="SUBMIT_FAILED", error=str(e))
            fail(f"{n} node(s): submission failed: {e}", code=1)
        out.print(f"{n:>3} node(s): run {run.id} job {job}", highlight=False)
        runs.append(run)
    path = record_sweep(base.name, runs, counts, runs_dir)
    out.print(f"sweep recorded: {path}\nreport once the jobs finish: seis sweep-report {path.stem}", highlight=False)


@app.command("sweep-report")
def sweep_report(
    sweep: Annotated[str, typer.Argument(help="Sweep name (prefix) or its JSON file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write an SVG plot here [next to the sweep file].")
    ] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Scaling efficiency of a sweep: table (or JSON) and an SVG plot."""
    from rich.table import Table

    from seiscli.launcher.sweep import find_sweep, report_rows, svg_plot, sweep_points

    try:
        path = find_sweep(sweep, runs_dir)
        points = sweep_points(path, runs_dir)
    except (LookupError, RecipeError) as e:
        fail(str(e))
    target = plot or path.with_suffix(".svg")
    target.write_text(svg_plot(points, f"scaling: {path.stem}"))
    if as_json:
        sys.stdout.write(json.dumps({"sweep": str(path), "plot": str(target), "points": report_rows(points)}, indent=2))
        sys.stdout.write("\n")
        return
    table = Table("nodes", "GPUs/procs", "state", "samples/s", "per node", "efficiency", "run")
    for p in points:
        sps = p.samples_per_s
        table.add_row(
            str(p.nodes),
            str(p.gpus),
            p.state,
            f"{sps:.2f}" if sps else "-",
            f"{sps / p.nodes:.2f}" if sps else "-",
            f"{p.efficiency:.1%}" if p.efficiency is not None else "-",
            p.run,
        )
    out.print(table)
    out.print(f"plot: {target}", highlight=False)
