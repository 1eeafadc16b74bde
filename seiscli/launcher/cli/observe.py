"""`seis top` (a live view of a running job) and `seis report` (plots of a run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from seiscli.launcher.cli.common import RunRef, RunsDir, app, fail, out, run_or_fail


@app.command()
def top(
    ref: RunRef,
    once: Annotated[bool, typer.Option("--once", help="Print one view and exit (scripts, tests).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --once: the numbers as JSON.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 2.0,
    runs_dir: RunsDir = None,
) -> None:
    """Live view of a running job: step, loss, samples/s, MFU, data wait, per-node step time, stragglers,
    checkpoint age. Ends when the job does (exit 0 if it COMPLETED)."""

    if as_json and not once:
        fail("--json: only with --once")
    if interval <= 0:
        fail(f"--interval {interval}: must be > 0 seconds")
    run = run_or_fail(ref, runs_dir)
    if as_json:
        from seiscli.launcher.jobs import current_statuses
        from seiscli.launcher.top import snapshot

        sub, st = current_statuses([run])[run.path]
        sys.stdout.write(json.dumps(snapshot(run, st.state.value, sub.get("job_id")).to_json(), indent=2) + "\n")
        return
    from seiscli.launcher.top import watch

    try:
        code = watch(run, out, once=once, interval_s=interval)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


@app.command()
def report(
    ref: RunRef,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG path [<run dir>/report.png].")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """A PNG of loss, throughput/MFU and data wait over steps (and eval, where logged), attempts marked."""

    run = run_or_fail(ref, runs_dir)
    if output is not None and output.suffix.lower() != ".png":
        fail(f"--output {output}: must end in .png")
    try:
        from seiscli.launcher.report_plot import write_report
    except ImportError as e:
        fail(f"seis report needs matplotlib ({e.name} missing): pip install 'seis[plot]'")
    try:
        path = write_report(run, output or run.path / "report.png")
    except ValueError as e:
        fail(str(e))
    out.print(f"wrote {path}", highlight=False, soft_wrap=True)
