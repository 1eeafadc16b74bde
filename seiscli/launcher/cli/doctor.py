"""`seis doctor`: pre-flight checks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from seiscli.launcher.cli.common import (
    ClusterOpt,
    Nodes,
    RunsDir,
    Sets,
    app,
    err,
    fail,
    out,
    overrides,
)
from seiscli.recipe import RecipeError


@app.command()
def doctor(
    recipe: Annotated[str | None, typer.Argument(help="The recipe to check (name or YAML path).")] = None,
    cluster: ClusterOpt = None,
    nodes: Nodes = None,
    set_: Sets = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    runs_dir: RunsDir = None,
    nccl: Annotated[
        bool,
        typer.Option(
            "--nccl",
            help="Measure all-reduce bandwidth on the partition's idle nodes (a short job), classify the nodes "
            "against the profile's baselines and write an exclude list for `seis launch --exclude-from`.",
        ),
    ] = False,
    nodelist: Annotated[
        str | None, typer.Option("--nodelist", help="With --nccl: these nodes (node[1-4]) instead of the idle ones.")
    ] = None,
    exclude_file: Annotated[
        Path | None, typer.Option("--exclude-file", help="With --nccl: where to write the exclude list.")
    ] = None,
    wait_s: Annotated[float, typer.Option("--wait", help="With --nccl: seconds to wait for the job.")] = 1800,
) -> None:
    """Pre-flight checks before a launch: scheduler, nodes, GPUs, EFA, data, checkpoints, image. Exit 1 on a fail.
    With --nccl: a network check of the nodes instead; exit 1 when a node is excluded."""
    if nccl:
        _nccl(cluster, nodelist, exclude_file, wait_s, as_json, runs_dir)
        return
    if recipe is None:
        fail("give a recipe to check (or --nccl for the network check)")
    if nodelist is not None or exclude_file is not None:
        fail("--nodelist/--exclude-file: only with --nccl")
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


def _nccl(
    cluster: str | None,
    nodelist: str | None,
    exclude_file: Path | None,
    wait_s: float,
    as_json: bool,
    runs_dir: Path | None,
) -> None:
    import time

    from seiscli.launcher import nccl_check as nc
    from seiscli.launcher.profiles import selected_profile
    from seiscli.launcher.runs import runs_root

    try:
        profile = selected_profile(cluster)
        if profile is None:
            fail("--nccl needs a cluster profile (--cluster NAME or $SEIS_CLUSTER) with nccl_check baselines")
        if profile.type not in ("slurm", "hyperpod-slurm"):
            fail(f"--nccl: profile {profile.name!r} is {profile.type}; the check runs on Slurm clusters")
        chk = profile.nccl_check
        missing = [k for k in ("intra_node_busbw_gbps", "inter_node_busbw_gbps") if getattr(chk, k) is None]
        if missing:
            fail(f"cluster profile {profile.name!r}: field 'nccl_check.{missing[0]}' is needed for --nccl (GB/s "
                 "a healthy node reaches; measure it once on known-good nodes)")  # fmt: skip
        nodes = nc.check_nodes_arg(nodelist) if nodelist else nc.idle_nodes(profile.partition)
    except RecipeError as e:
        fail(str(e))
    if not nodes:
        fail(f"--nccl: no idle node in partition {profile.partition or '(default)'}; give --nodelist")
    if wait_s <= 0:
        fail(f"--wait {wait_s}: must be > 0 seconds")
    out_dir = runs_root(runs_dir) / "nccl-check" / time.strftime("%Y%m%d-%H%M%S")
    echo = None if as_json else (lambda m: err.print(m, highlight=False))
    try:
        job, state = nc.submit_and_wait(profile, nodes, out_dir, wait_s=wait_s, echo=echo)
    except RuntimeError as e:
        fail(str(e), 1)
    result = nc.classify(profile, nodes, out_dir, job)
    target = exclude_file or out_dir / nc.EXCLUDE_FILE
    nc.write_exclude(target, result)
    result.exclude_file = str(target)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json() | {"job_state": state, "dir": str(out_dir)}, indent=2) + "\n")
    else:
        err.print(f"job {job}: {state}", highlight=False)
        nc.print_result(result, out)
    raise typer.Exit(nc.exit_code(result))
