"""`seis doctor`: pre-flight checks."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from seiscli.launcher.cli.common import (
    ClusterOpt,
    Nodes,
    RunsDir,
    Sets,
    app,
    fail,
    out,
    overrides,
)
from seiscli.recipe import RecipeError


@app.command()
def doctor(
    recipe: Annotated[str, typer.Argument(help="The recipe to check (name or YAML path).")],
    cluster: ClusterOpt = None,
    nodes: Nodes = None,
    set_: Sets = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Pre-flight checks before a launch: scheduler, nodes, GPUs, EFA, data, checkpoints, image. Exit 1 on a fail."""
    from seiscli.launcher.doctor import run_checks
    from seiscli.launcher.profiles import load_recipe_for_cluster
    from seiscli.launcher.runs import runs_root

    try:
        sets = overrides(nodes=nodes, sets=set_)
    except RecipeError as e:
        fail(str(e))
    rows = run_checks(lambda: load_recipe_for_cluster(recipe, sets, cluster), runs_root(runs_dir))
    failed = any(r.status == "fail" for r in rows)
    if as_json:
        sys.stdout.write(json.dumps({"ok": not failed, "checks": [r.to_json() for r in rows]}, indent=2) + "\n")
        raise typer.Exit(1 if failed else 0)
    from rich.table import Table

    colour = {"pass": "green", "warn": "yellow", "fail": "bold red"}
    table = Table("check", "", "detail", "fix", show_lines=False)
    for r in rows:
        table.add_row(r.name, f"[{colour[r.status]}]{r.status}[/]", r.detail, r.fix)
    out.print(table)
    raise typer.Exit(1 if failed else 0)
