"""`seis runs`, `status`, `cancel`, `logs`: watching jobs from a login node."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from seiscli.launcher.cli.common import (
    RunsDir,
    app,
    fail,
    out,
    run_or_fail,
)


@app.command()
def runs(runs_dir: RunsDir = None) -> None:
    """The recorded runs, newest first."""
    from rich.table import Table

    from seiscli.launcher.runs import iter_runs, runs_root

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
    from seiscli.launcher.jobs import run_status_rows, show_status

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
    from seiscli.launcher.jobs import cancel_run

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
    errors: Annotated[
        bool,
        typer.Option("--errors", help="The first error across all ranks and attempts, then the ranks it took down."),
    ] = False,
    grep: Annotated[
        str | None, typer.Option("--grep", help="Lines matching this regular expression, in every rank's log.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --errors: machine-readable output.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """A run's output: the job's log and rank 0 (or one rank, or one node's ranks); or its first error (--errors)."""
    from seiscli.launcher.jobs import show_logs

    if errors or grep is not None:
        raise typer.Exit(_scan_logs(ref, runs_dir, errors=errors, grep=grep, as_json=as_json, follow=follow))
    if as_json:
        fail("--json: only with --errors")
    if _eks_logs(ref, runs_dir, follow=follow, rank=rank, node=node, tail=tail):
        return
    try:
        code = show_logs(ref, runs_dir, fail=fail, follow=follow, rank=rank, node=node, tail=tail)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _eks_logs(ref: str, runs_dir: Path | None, **kw: Any) -> bool:
    """hyperpod-eks runs: their output lives in pods, read through the Kubernetes API; False for other runs."""
    from seiscli.launcher.runs import find_run

    try:
        run = find_run(ref, runs_dir)
    except LookupError:
        return False  # show_logs says it
    if run.submission().get("backend") != "hyperpod-eks":
        return False
    from seiscli.launcher.backends.base import SubmitError
    from seiscli.launcher.backends.hyperpod_eks import HyperPodEksBackend

    try:
        code = HyperPodEksBackend().show_logs(run, **kw)
    except (RuntimeError, SubmitError) as e:
        fail(str(e), 1)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _scan_logs(ref: str, runs_dir: Path | None, *, errors: bool, grep: str | None, as_json: bool, follow: bool) -> int:
    from seiscli.launcher.errors_view import print_errors, print_grep

    if errors and grep is not None:
        fail("--errors and --grep: give one of them")
    if follow:
        fail("--follow: not with --errors or --grep (they read the logs as they are)")
    if as_json and not errors:
        fail("--json: only with --errors")
    if grep is not None:
        try:
            re.compile(grep)
        except re.error as e:
            fail(f"--grep {grep!r}: not a regular expression ({e})")
    run = run_or_fail(ref, runs_dir)
    try:
        if errors:
            return print_errors(run, sys.stdout, as_json=as_json)
        return print_grep(run, re.compile(grep or ""), sys.stdout)
    except typer.Exit:
        raise
    except RuntimeError as e:  # the Kubernetes API refused or is unreachable
        fail(str(e), 1)
