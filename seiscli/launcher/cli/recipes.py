"""`seis recipes list|show|validate`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from seiscli.launcher.cli.common import (
    Sets,
    app,
    out,
    resolve,
)
from seiscli.recipe import RecipeError, list_recipes, load_recipe

recipes_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list() -> None:
    """The shipped recipes."""
    from rich.table import Table

    table = Table("recipe", "nodes x procs", "model (enc / dec)", "crop", "tokens", "strategy", "cp")
    for n in list_recipes():
        try:
            r = load_recipe(n)
        except RecipeError as e:
            table.add_row(n, f"[red]invalid: {e}[/]", "", "", "", "", "")
            continue
        m = r.model
        table.add_row(
            n,
            f"{r.cluster.nodes} x {r.cluster.procs_per_node}{' GPU' if r.cluster.gpus_per_node else ' CPU'}",
            f"{m.encoder_depth}x{m.encoder_dim} / {m.decoder_depth}x{m.decoder_dim}",
            "x".join(map(str, r.data.crop)),
            f"{r.num_tokens:,}",
            r.parallelism.strategy,
            str(r.parallelism.cp),
        )
    out.print(table)


@recipes_app.command("show")
def recipes_show(
    recipe: str,
    set_: Sets = None,
) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied)."""
    r = resolve(recipe, sets=set_)
    sys.stdout.write(r.to_yaml())


@recipes_app.command("validate")
def recipes_validate(paths: Annotated[list[str], typer.Argument(help="Recipe names or YAML paths.")]) -> None:
    """Check recipes; exit 2 at the first invalid one."""
    for p in paths:
        r = resolve(p)
        out.print(f"[green]ok[/] {p}: {r.num_tokens:,} tokens/sample, global batch {r.global_batch}", highlight=False)
