"""`seis`: the command-line front. Thin: every command parses, calls one module, prints.

Nothing here imports torch, deepspeed or zarr; the commands that need them import lazily.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from seiscli.recipe import STRATEGIES, Recipe, RecipeError, find_recipe, list_recipes, load_recipe, parse_set

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Launch and watch seismic foundation-model training (3D ViT-MAE) on Slurm, HyperPod or this machine.",
)
recipes_app = typer.Typer(no_args_is_help=True, help="List, show and validate recipes.")
app.add_typer(recipes_app, name="recipes")

out = Console()
err = Console(stderr=True)

BAD_INPUT = 2  # exit code for anything the user can fix in their command or recipe


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


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
    """`resolve` with a cluster profile between the recipe file and the overrides (see seiscli/profiles.py)."""
    from seiscli.profiles import load_recipe_for_cluster

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


# -- commands ------------------------------------------------------------------------------------


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
    from seiscli.launch import plan_launch

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
) -> None:
    """Render the recipe's job script, submit it and record a run directory."""
    from seiscli.launch import execute, plan_launch, resume_source

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
    from seiscli.launch import plan_launch, write_run
    from seiscli.sweep import parse_nodes, record_sweep, sweep_recipes

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
    from seiscli.backends import get_backend
    from seiscli.backends.base import SubmitError

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

    from seiscli.sweep import find_sweep, report_rows, svg_plot, sweep_points

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


@app.command()
def runs(runs_dir: RunsDir = None) -> None:
    """The recorded runs, newest first."""
    from rich.table import Table

    from seiscli.runs import iter_runs, runs_root

    table = Table("run", "backend", "job", "state", "created", "last step")
    count = 0
    for run in iter_runs(runs_dir):
        sub = run.submission()
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(sub.get("created", 0)))
        table.add_row(
            run.id,
            sub.get("backend", "-"),
            str(sub.get("job_id", "-")),
            sub.get("state", "-"),
            created,
            str(run.last_metrics().get("step", "-")),
        )
        count += 1
    if count == 0:
        out.print(f"no runs under {runs_root(runs_dir)}")
        return
    out.print(table)


@app.command()
def status(
    ref: Annotated[str | None, typer.Argument(help="A run (name, <name>/<timestamp>, job id or path).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    all_users: Annotated[bool, typer.Option("--all-users", help="Every user's runs, not only yours.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """State of your runs in one table, or of one run in detail (history, nodes, exit code, error line)."""
    from seiscli.jobs import run_status_rows, show_status

    rows = run_status_rows(ref, runs_dir, fail=fail, all_users=all_users)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    show_status(rows, detail=ref is not None, console=out)


@app.command()
def cancel(
    ref: Annotated[str, typer.Argument(help="A run (name, <name>/<timestamp>, job id or path).")],
    runs_dir: RunsDir = None,
) -> None:
    """Cancel a run's job."""
    from seiscli.jobs import cancel_run

    cancel_run(ref, runs_dir, fail=fail, console=out)


@app.command()
def logs(
    ref: Annotated[str, typer.Argument(help="A run (name, <name>/<timestamp>, job id or path).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends; exit with its status.")
    ] = False,
    rank: Annotated[int | None, typer.Option("--rank", help="Only this rank's output.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only the ranks that ran on this node.")] = None,
    tail: Annotated[int | None, typer.Option("--tail", help="Start from the last K lines of each file.")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """A run's output: the job's log and rank 0 (or one rank, or one node's ranks)."""
    from seiscli.jobs import show_logs

    if _eks_logs(ref, runs_dir, follow=follow, rank=rank, node=node, tail=tail):
        return
    try:
        code = show_logs(ref, runs_dir, fail=fail, follow=follow, rank=rank, node=node, tail=tail)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _eks_logs(ref: str, runs_dir: Path | None, **kw: Any) -> bool:
    """hyperpod-eks runs: their output lives in pods, read through the Kubernetes API; False for other runs."""
    from seiscli.runs import find_run

    try:
        run = find_run(ref, runs_dir)
    except LookupError:
        return False  # show_logs says it
    if run.submission().get("backend") != "hyperpod-eks":
        return False
    from seiscli.backends.base import SubmitError
    from seiscli.backends.hyperpod_eks import HyperPodEksBackend

    try:
        code = HyperPodEksBackend().show_logs(run, **kw)
    except (RuntimeError, SubmitError) as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


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
    from seiscli.doctor import run_checks
    from seiscli.profiles import load_recipe_for_cluster
    from seiscli.runs import runs_root

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


def _mount_data_commands() -> None:
    from seiscli.data_cli import app as data_app  # light: heavy imports live inside its commands

    app.add_typer(data_app, name="data")


_mount_data_commands()


def main() -> None:
    app()
