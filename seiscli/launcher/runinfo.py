"""What `seis show RUN` and `seis status RUN` say about a run's provenance and attempts. Reads files only
(seiscli/run_layout.py); no scheduler call, no torch."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from seiscli.launcher.backends.base import JobState
from seiscli.launcher.runs import Run
from seiscli.run_layout import (
    LAUNCH_PROVENANCE,
    attempt_provenance_path,
    provenance_dir,
    read_attempts,
    read_json,
)

# From each attempt's provenance: the versions worth a line of their own (all packages: --packages / --json).
ENV_KEYS = ("node", "nodes", "python", "torch", "cuda", "cudnn", "nccl", "driver", "gpus", "git_commit", "container")


def attempts(
    run: Run, scheduler: list[dict[str, Any]] | None = None, sub: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The ledger's attempts; an attempt whose job script could not write its end (killed: node lost, time
    limit) takes the end from the scheduler's record of that attempt, where there is one; the last attempt of a
    finished run without an end line (a local run: no job script writes one) takes the run's final state."""
    rows = read_attempts(run.path)
    _fill_from_scheduler(rows, scheduler)
    sub = sub or {}
    try:
        finished = JobState(sub.get("state") or "UNKNOWN").finished
    except ValueError:
        finished = False
    if rows and rows[-1]["end_time"] is None and finished:
        last = rows[-1]
        last |= {"exit_code": sub.get("exit_code"), "signal": sub.get("signal"), "action": sub["state"]}
        last["why"] = "no end line in the ledger; the run's final state"
        if last["last_step"] is None:
            last["last_step"] = run.last_metrics().get("step")
    return rows


def _fill_from_scheduler(rows: list[dict[str, Any]], scheduler: list[dict[str, Any]] | None) -> None:
    sched = scheduler or []
    for row in rows:
        i = row["attempt"] - 1
        if row["end_time"] is not None or not 0 <= i < len(sched):
            continue
        s = sched[i]
        if s.get("end_time") and s.get("state") not in ("RUNNING", "PENDING"):
            row |= {
                "end_time": s["end_time"],
                "exit_code": s.get("exit_code"),
                "signal": s.get("signal"),
                "action": s.get("state"),
                "why": f"no end line from the job script; state from {s.get('source')}",
            }


def launch_provenance(run: Run) -> dict[str, Any]:
    return read_json(provenance_dir(run.path) / LAUNCH_PROVENANCE)


def run_info(run: Run, sub: dict[str, Any], *, scheduler: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything `seis show` prints, as JSON (`sub`: the run's submission record, state refreshed)."""
    rows = attempts(run, scheduler, sub)
    envs = {}
    for row in rows:
        env = read_json(attempt_provenance_path(run.path, row["attempt"]))
        if env:
            envs[str(row["attempt"])] = env
    return {
        "run": run.id,
        "path": str(run.path),
        "backend": sub.get("backend"),
        "job_id": sub.get("job_id"),
        "state": sub.get("state"),
        "rerun_of": sub.get("rerun_of"),
        "resumed_from": sub.get("resumed_from"),
        "launch": launch_provenance(run),
        "attempts": rows,
        "environment": envs,
    }


def _t(t: float | None) -> str:
    return time.strftime("%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def code_line(launch: dict[str, Any]) -> str:
    git = launch.get("git") or {}
    if not git.get("commit"):
        return git.get("note") or "-"
    text = f"{git['commit'][:12]}"
    if git.get("branch"):
        text += f" ({git['branch']})"
    if git.get("dirty"):
        text += f" + uncommitted changes in {git.get('patch_file') or 'no patch'}"
    return text


def image_line(launch: dict[str, Any]) -> str:
    c = launch.get("container")
    if not c:
        return "none (the nodes' own environment)"
    return f"{c['image']}  digest {c.get('digest') or '-'}" + (f"  ({c['note']})" if c.get("note") else "")


def attempts_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("#", "job", "restart", "nodes", "start", "end", "exit", "steps", "resumed from", "action")
    for a in rows:
        exit_text = "-" if a["exit_code"] is None else str(a["exit_code"])
        if a.get("signal"):
            exit_text += f" (signal {a['signal']})"
        steps = f"{a['first_step'] or '?'}-{a['last_step'] if a['last_step'] is not None else '?'}"
        action = (a.get("action") or "running?") + (f": {a['why']}" if a.get("why") else "")
        if a.get("step_restarts"):
            action += f" (step restarted {a['step_restarts']}x)"
        resumed = str(a.get("resumed_from") or "-")
        if a.get("recipe_changes"):
            resumed += " with recipe changes: " + "; ".join(a["recipe_changes"])
        table.add_row(
            str(a["attempt"]),
            str(a.get("job_id") or "-"),
            str(a.get("restart_count") if a.get("restart_count") is not None else "-"),
            " ".join(a.get("nodes") or []) or "-",
            _t(a.get("start_time")),
            _t(a.get("end_time")),
            exit_text,
            steps,
            escape(resumed),
            escape(action),
        )
    return table


def show(info: dict[str, Any], console: Console, *, packages: bool = False) -> None:
    def line(key: str, value: Any) -> None:
        console.print(f"[bold]{key:>12}[/]  {escape(str(value)) if value not in (None, '', []) else '-'}")

    launch = info["launch"]
    line("run", info["run"])
    line("path", info["path"])
    line("job", f"{info.get('job_id') or '-'} ({info.get('backend') or '-'}), {info.get('state') or '-'}")
    if info.get("rerun_of"):
        line("rerun of", info["rerun_of"])
    if info.get("resumed_from"):
        line("resumed", info["resumed_from"])
    line("code", code_line(launch) if launch else "no provenance/launch.json (launched by an older seis?)")
    line("image", image_line(launch) if launch else None)
    if launch:
        line("launched", f"{_t(launch.get('time'))} by seis {launch.get('seis_version')}")
    for k, env in info["environment"].items():
        console.print(f"[bold]   attempt {k}[/]  [dim]as the job saw it, rank 0[/]")
        for key in ENV_KEYS:
            v = env.get(key)
            if v not in (None, "", [], {}):
                line(key, " ".join(v) if isinstance(v, list) else v)
        line(
            "packages", f"{len(env.get('packages') or {})} installed" + ("" if packages else " (--packages lists them)")
        )
        if packages:
            for name, ver in (env.get("packages") or {}).items():
                console.print(f"              {escape(name)}=={escape(str(ver))}", highlight=False)
    if info["attempts"]:
        console.print(attempts_table(info["attempts"]))
    else:
        line("attempts", "none recorded yet")
