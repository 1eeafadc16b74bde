"""What every command module shares: the typer app, consoles, `fail` (exit 2), recipe override options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from seiscli.recipe import STRATEGIES, Recipe, RecipeError, load_recipe, parse_set

if TYPE_CHECKING:
    from seiscli.launcher.runs import Run

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Launch and watch seismic foundation-model training (3D ViT-MAE) on Slurm, HyperPod or this machine.",
)

out = Console()
err = Console(stderr=True)

BAD_INPUT = 2  # exit code for anything the user can fix in their command or recipe


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


RunRef = Annotated[str, typer.Argument(help="A run (name, <name>/<timestamp>, job id or path).")]


def run_or_fail(ref: str, runs_dir: Path | None) -> Run:
    """The recorded run RUN names (name, name/timestamp, job id or path), or the one-line error, exit 2."""
    from seiscli.launcher.runs import find_run

    try:
        return find_run(ref, runs_dir)
    except LookupError as e:
        fail(str(e))


# -- recipe overrides shared by launch / render -------------------------------------------------

Nodes = Annotated[int | None, typer.Option("--nodes", "-N", help="Number of nodes.")]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help=f"One of {', '.join(STRATEGIES)}.")]
ZeroStage = Annotated[int | None, typer.Option("--zero-stage", help="DeepSpeed ZeRO stage 1, 2 or 3.")]
CP = Annotated[int | None, typer.Option("--cp", help="Context-parallel degree.")]
Steps = Annotated[int | None, typer.Option("--steps", help="Training steps.")]
Name = Annotated[str | None, typer.Option("--name", help="Run name (names the run directory).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Any field: --set model.encoder_depth=24 (repeatable).")]
RunsDir = Annotated[Path | None, typer.Option("--runs-dir", help="Root of run directories [$SEIS_RUNS_DIR or ./runs].")]
ClusterOpt = Annotated[
    str | None,
    typer.Option("--cluster", "-C", help="Cluster profile: clusters/NAME.yaml or a path [$SEIS_CLUSTER or 'default']."),
]


def overrides(
    nodes: int | None = None,
    strategy: str | None = None,
    zero_stage: int | None = None,
    cp: int | None = None,
    steps: int | None = None,
    name: str | None = None,
    sets: list[str] | None = None,
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in sets or []:
        key, value = parse_set(item)
        found[key] = value
    if zero_stage is not None:
        if zero_stage not in (1, 2, 3):
            raise RecipeError(f"--zero-stage {zero_stage}: allowed 1, 2, 3")
        if strategy is not None and strategy != f"zero{zero_stage}":
            raise RecipeError(f"--zero-stage {zero_stage} contradicts --strategy {strategy}")
        strategy = f"zero{zero_stage}"
    for key, value in {
        "cluster.nodes": nodes,
        "parallelism.strategy": strategy,
        "parallelism.cp": cp,
        "train.steps": steps,
        "name": name,
    }.items():
        if value is not None:
            found[key] = value
    return found


def resolve(recipe: str, **kw: Any) -> Recipe:
    try:
        return load_recipe(recipe, overrides(**kw))
    except RecipeError as e:
        fail(str(e))


def resolve_for_cluster(recipe: str, cluster: str | None, **kw: Any) -> Recipe:
    """`resolve` with a cluster profile between the recipe file and the overrides (see seiscli/launcher/profiles.py)."""
    from seiscli.launcher.profiles import load_recipe_for_cluster

    try:
        return load_recipe_for_cluster(recipe, overrides(**kw), cluster)
    except RecipeError as e:
        fail(str(e))


def print_script(text: str) -> None:
    if out.is_terminal:
        from rich.syntax import Syntax

        out.print(Syntax(text, "bash", theme="ansi_dark", word_wrap=True))
    else:
        sys.stdout.write(text)
