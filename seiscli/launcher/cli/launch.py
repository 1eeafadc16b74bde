"""`seis render` and `seis launch`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from seiscli.launcher.cli.common import (
    CP,
    ClusterOpt,
    Name,
    Nodes,
    RunsDir,
    Sets,
    Steps,
    StrategyOpt,
    ZeroStage,
    app,
    err,
    fail,
    out,
    print_script,
    resolve_for_cluster,
)
from seiscli.recipe import Recipe, RecipeError, find_recipe


@app.command()
def render(
    recipe: Annotated[str, typer.Argument(help="Recipe name (see `seis recipes list`) or YAML path.")],
    nodes: Nodes = None,
    strategy: StrategyOpt = None,
    zero_stage: ZeroStage = None,
    cp: CP = None,
    steps: Steps = None,
    name: Name = None,
    set_: Sets = None,
    runs_dir: RunsDir = None,
    cluster: ClusterOpt = None,
) -> None:
    """Print the job script a launch would submit. Submits nothing, writes nothing."""
    from seiscli.launcher.launch import plan_launch

    kw = {"nodes": nodes, "strategy": strategy, "zero_stage": zero_stage, "cp": cp, "steps": steps, "name": name}
    r = resolve_for_cluster(recipe, cluster, sets=set_, **kw)
    try:
        print_script(plan_launch(r, runs_dir).script)
    except RecipeError as e:
        fail(str(e))


@app.command()
def launch(
    recipe: Annotated[str, typer.Argument(help="Recipe name (see `seis recipes list`) or YAML path.")],
    nodes: Nodes = None,
    strategy: StrategyOpt = None,
    zero_stage: ZeroStage = None,
    cp: CP = None,
    steps: Steps = None,
    name: Name = None,
    set_: Sets = None,
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="local, slurm, hyperpod-slurm or hyperpod-eks [profile's type, else recipe's]."),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the script; submit and write nothing.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Local backend: start and return at once.")] = False,
    runs_dir: RunsDir = None,
    cluster: ClusterOpt = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue RUN (name, <name>/<timestamp>, job id or path) from its newest complete checkpoint; "
            "the new run reads and writes RUN's checkpoint directory.",
        ),
    ] = None,
    exclude_from: Annotated[
        Path | None,
        typer.Option(
            "--exclude-from",
            help="Keep the job off the nodes listed in FILE (one per line, e.g. from `seis doctor --nccl`): "
            "#SBATCH --exclude.",
        ),
    ] = None,
) -> None:
    """Render the recipe's job script, submit it and record a run directory."""
    from seiscli.launcher.launch import execute, plan_launch, resume_source

    sets = list(set_ or [])
    if backend is not None:
        sets.append(f"cluster.backend={backend}")
    source = None
    if resume is not None:
        try:
            source = resume_source(resume, runs_dir)
        except (LookupError, RecipeError) as e:
            fail(f"--resume {resume}: {e}")
        sets.append(f"checkpoint.dir={json.dumps(str(source.checkpoint_dir))}")  # JSON is YAML: any path reads back
    kw = {"nodes": nodes, "strategy": strategy, "zero_stage": zero_stage, "cp": cp, "steps": steps, "name": name}
    r = resolve_for_cluster(recipe, cluster, sets=sets, **kw)
    if exclude_from is not None:
        r = _with_exclude(r, exclude_from, recipe, cluster, sets, kw)
    try:
        plan = plan_launch(r, runs_dir, recipe_source=find_recipe(recipe), resume=source)
    except RecipeError as e:
        fail(str(e))
    for note in plan.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    if dry_run:
        print_script(plan.script)
        return
    code = execute(plan, console=out, detach=detach)
    raise typer.Exit(code)


def _with_exclude(
    r: Recipe, path: Path, recipe: str, cluster: str | None, sets: list[str], kw: dict[str, Any]
) -> Recipe:
    """The recipe again, with `--exclude=<nodes>` added to cluster.extra_sbatch (so recipe.yaml records it)."""
    from seiscli.launcher.nccl_check import read_exclude

    if r.cluster.backend not in ("slurm", "hyperpod-slurm"):
        fail(f"--exclude-from: only for Slurm backends (this run's is {r.cluster.backend})")
    try:
        names = read_exclude(path)
    except RecipeError as e:
        fail(str(e))
    if not names:
        return r
    if any(x.startswith(("--exclude", "-x")) for x in r.cluster.extra_sbatch):
        fail("--exclude-from: cluster.extra_sbatch already has an --exclude; keep one of them")
    lines = [*r.cluster.extra_sbatch, f"--exclude={','.join(names)}"]
    return resolve_for_cluster(recipe, cluster, sets=[*sets, f"cluster.extra_sbatch={json.dumps(lines)}"], **kw)
