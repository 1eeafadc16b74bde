"""Status, logs and cancel for recorded runs, whatever backend ran them.

The scheduler is asked once per command for all runs (one squeue call, one sacct call, ...), never once per
run. What it says is stored back into each run's submission.json (state, exit code, nodes, and a history of
the transitions seen), so a job the scheduler has forgotten still shows its last known state.
"""

from __future__ import annotations

import getpass
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Column, Table

from seiscli.launcher.backends.base import JobState, JobStatus
from seiscli.launcher.runs import Run, find_run, iter_runs

# Finished for good: nothing the scheduler says later changes these, so they are not asked about again.
# (PREEMPTED and NODE_FAIL are not here: a job with --requeue comes back from them.)
SETTLED = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.OUT_OF_MEMORY,
        JobState.SUBMIT_FAILED,
    }
)
SLURM_BACKENDS = ("slurm", "hyperpod-slurm")


# -- states ----------------------------------------------------------------------------------------------


def stored_status(sub: dict[str, Any]) -> JobStatus:
    try:
        state = JobState(sub.get("state", "UNKNOWN"))
    except ValueError:
        state = JobState.UNKNOWN
    return JobStatus(
        state=state,
        reason=sub.get("reason") or sub.get("error"),
        exit_code=sub.get("exit_code"),
        nodes=list(sub.get("node_list") or []),
        elapsed_s=sub.get("elapsed_s"),
        source="stored",
        restarts=int(sub.get("restarts") or 0),
        signal=sub.get("signal"),
    )


def current_statuses(runs: Iterable[Run]) -> dict[Path, tuple[dict[str, Any], JobStatus]]:
    """Each run's submission record and its current status; one batched query per backend."""
    from seiscli.launcher.backends import get_backend

    result: dict[Path, tuple[dict[str, Any], JobStatus]] = {}
    ask: dict[str, list[Run]] = {}
    for run in runs:
        sub = run.submission()
        st = stored_status(sub)
        result[run.path] = (sub, st)
        if sub.get("job_id") and sub.get("backend") and st.state not in SETTLED:
            key = "slurm" if sub["backend"] in SLURM_BACKENDS else sub["backend"]
            ask.setdefault(key, []).append(run)
    for key, group in ask.items():
        try:
            backend = get_backend(key)
        except ValueError:
            continue
        try:
            if hasattr(backend, "statuses"):
                found: dict[Path, JobStatus] = backend.statuses(group)
            else:
                found = {run.path: backend.status(run) for run in group}
        except Exception as e:  # one unreachable scheduler must not hide the other runs
            for run in group:
                result[run.path][1].reason = f"could not ask {key}: {e}"
            continue
        for run in group:
            sub, old = result[run.path]
            new = found.get(run.path)
            if new is None:
                # No source knows the job any more (aged out, accounting off): keep what was stored, but do
                # not claim it still runs.
                new = old
                if not old.state.finished:
                    new.reason = f"last seen {old.state.value}; {key} no longer knows the job"
                    new.state = JobState.UNKNOWN
            else:
                sub = record(run, sub, new)
            result[run.path] = (sub, new)
    return result


def record(run: Run, sub: dict[str, Any], st: JobStatus) -> dict[str, Any]:
    """Store what the scheduler said, with a history entry per transition; write only when something changed."""
    fields: dict[str, Any] = {
        "state": st.state.value,
        "exit_code": st.exit_code,
        "signal": st.signal,
        "reason": st.reason,
        "node_list": st.nodes or sub.get("node_list") or [],
        "restarts": st.restarts,
    }
    if all(sub.get(k) == v for k, v in fields.items()):
        return sub
    history = list(sub.get("history") or [])
    if sub.get("state") != st.state.value or int(sub.get("restarts") or 0) != st.restarts:
        # When it happened, where the scheduler says so; else when it was seen.
        at = st.end_time if st.state.finished else st.start_time if st.state == JobState.RUNNING else None
        entry = {"state": st.state.value, "at": at or time.time(), "source": st.source}
        if st.reason:
            entry["reason"] = st.reason
        history.append(entry)
    fields |= {"history": history, "elapsed_s": st.elapsed_s, "state_source": st.source, "checked": time.time()}
    try:
        run.update_submission(**fields)
    except OSError:
        return sub  # another seis process is writing it at this moment; the next look records it
    return sub | fields


def exit_status(st: JobStatus) -> int:
    """What `seis logs -f` exits with: 0 for COMPLETED, the job's own code for FAILED, else 1."""
    if st.state == JobState.COMPLETED:
        return 0
    if st.state == JobState.FAILED and st.exit_code:
        return st.exit_code
    return 1


def state_label(st: JobStatus) -> str:
    """`PENDING (Resources)`, `FAILED (exit 3)`, `CANCELLED (signal 15)`, `REQUEUED (restart 1)`."""
    s = st.state
    if s in (JobState.PENDING, JobState.UNKNOWN) and st.reason:
        return f"{s.value} ({st.reason})"
    if s == JobState.REQUEUED:
        return f"REQUEUED (restart {st.restarts}{', ' + st.reason if st.reason else ''})"
    if s == JobState.RUNNING and st.restarts:
        return f"RUNNING (restart {st.restarts})"
    if s in (JobState.FAILED, JobState.OUT_OF_MEMORY, JobState.NODE_FAIL) and st.exit_code:
        return f"{s.value} (exit {st.exit_code})"
    if s == JobState.CANCELLED and st.signal:
        return f"CANCELLED (signal {st.signal})"
    return s.value


def _row(run: Run, sub: dict[str, Any], st: JobStatus) -> dict[str, Any]:
    last = run.last_metrics()
    return {
        "run": run.id,
        "path": str(run.path),
        "backend": sub.get("backend"),
        "job_id": sub.get("job_id"),
        "state": st.state.value,
        "reason": st.reason,
        "exit_code": st.exit_code,
        "signal": st.signal,
        "restarts": st.restarts,
        "nodes": st.node_count or len(st.nodes) or _recipe_nodes(run),
        "node_list": st.nodes,
        "elapsed_s": st.elapsed_s,
        "source": st.source if st.source != "stored" else f"{sub.get('state_source') or 'seis'}, stored",
        "submitted": sub.get("submitted"),
        "last_step": last.get("step"),
        "samples_per_s": last.get("samples_per_s"),
    }


def _recipe_nodes(run: Run) -> int | None:
    """cluster.nodes from the run's recipe.yaml, read as text: no YAML or pydantic for a table cell."""
    try:
        text = run.recipe_path.read_text()
    except OSError:
        return None
    m = re.search(r"^cluster:\n(?:[ \t]+.*\n)*?[ \t]+nodes: (\d+)", text, re.M)
    return int(m.group(1)) if m else None


def _procs_per_node(run: Run) -> int:
    import yaml

    c = (yaml.safe_load(run.recipe_path.read_text()) or {}).get("cluster", {})
    return int(c.get("gpus_per_node") or c.get("cpu_procs_per_node") or 1)


def run_status_rows(
    ref: str | None, root: str | Path | None, *, fail: Callable[[str], Any], all_users: bool = False
) -> list[dict[str, Any]]:
    """One row per run (the current user's, newest first), or one detailed row for `ref`."""
    if ref is not None:
        try:
            run = find_run(ref, root)
        except LookupError as e:
            fail(str(e))
            return []
        sub, st = current_statuses([run])[run.path]
        return [_row(run, sub, st) | run_details(run, sub, st)]
    me = getpass.getuser()
    runs = [r for r in iter_runs(root) if all_users or r.submission().get("user") in (me, None)]
    statuses = current_statuses(runs)
    return [_row(run, *statuses[run.path]) for run in runs]


def run_details(run: Run, sub: dict[str, Any], st: JobStatus) -> dict[str, Any]:
    """What `seis status RUN` adds: history, every attempt, log files, and the error line of a failure."""
    from seiscli.launcher.runinfo import attempts, code_line, image_line, launch_provenance

    details: dict[str, Any] = {"history": sub.get("history") or [], "scheduler_attempts": []}
    if sub.get("backend") in SLURM_BACKENDS and sub.get("job_id"):
        from seiscli.launcher.backends.slurm import job_attempts

        details["scheduler_attempts"] = [a.to_json() for a in job_attempts(str(sub["job_id"]))]
    # The attempt ledger the job wrote (seiscli/run_layout.py), ends it could not write taken from the scheduler.
    details["attempts"] = attempts(run, details["scheduler_attempts"], {"state": st.state.value} | _end(st))
    launch = launch_provenance(run)
    details["code"] = code_line(launch) if launch else None
    details["image"] = image_line(launch) if launch else None
    for key in ("rerun_of", "resumed_from"):
        details[key] = sub.get(key)
    details["logs"] = [str(p.relative_to(run.path)) for p in log_files(run, sub, all_ranks=True)]
    if st.state.finished and st.state != JobState.COMPLETED:
        details["error_line"] = error_line(run, sub)
    return details


def _end(st: JobStatus) -> dict[str, Any]:
    return {"exit_code": st.exit_code, "signal": st.signal}


def _fmt_elapsed(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    days, rest = divmod(s, 86400)
    clock = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def show_status(rows: list[dict[str, Any]], *, detail: bool, console: Console) -> None:
    if not rows:
        console.print("no runs")
        return
    if not console.is_terminal:  # piped: not cut to 80 columns, so scripts and logs keep whole names and lines
        console = Console(file=console.file, width=max(console.width, 200), no_color=True)
    if detail:
        _show_detail(rows[0], console)
        return
    table = Table(
        Column("run", no_wrap=True),
        Column("job", no_wrap=True),
        Column("state", no_wrap=True),
        Column("nodes", justify="right"),
        Column("elapsed", justify="right", no_wrap=True),
        Column("step", justify="right"),
        Column("samples/s", justify="right"),
    )
    for r in rows:
        sps = r.get("samples_per_s")
        st = _row_status(r)
        table.add_row(
            r["run"],
            str(r.get("job_id") or "-"),
            state_label(st),
            str(r.get("nodes") or "-"),
            _fmt_elapsed(r.get("elapsed_s")),
            str(r.get("last_step") if r.get("last_step") is not None else "-"),
            f"{sps:.1f}" if isinstance(sps, (int, float)) else "-",
        )
    console.print(table)


def _row_status(r: dict[str, Any]) -> JobStatus:
    """The status a row of `status_rows` was made from, for its label."""
    return JobStatus(
        state=JobState(r["state"]),
        reason=r.get("reason"),
        exit_code=r.get("exit_code"),
        signal=r.get("signal"),
        restarts=r.get("restarts") or 0,
    )


def _show_detail(r: dict[str, Any], console: Console) -> None:
    def line(key: str, value: Any) -> None:
        console.print(f"[bold]{key:>12}[/]  {value if value not in (None, '', []) else '-'}", highlight=False)

    st = _row_status(r)
    line("run", r["run"])
    line("path", r["path"])
    line("backend", r.get("backend"))
    line("job", r.get("job_id"))
    line("state", f"{state_label(st)}   [dim](from {r.get('source')})[/]")
    if r.get("reason") and r["state"] not in ("PENDING", "UNKNOWN", "REQUEUED"):
        line("reason", r["reason"])
    line("exit code", r.get("exit_code") if r["state"] not in ("PENDING", "RUNNING", "REQUEUED") else None)
    line("nodes", f"{r.get('nodes') or '-'}: {' '.join(r.get('node_list') or []) or '-'}")
    line("submitted", _fmt_time(r.get("submitted")))
    line("elapsed", _fmt_elapsed(r.get("elapsed_s")))
    line("last step", r.get("last_step"))
    sps = r.get("samples_per_s")
    line("samples/s", f"{sps:.1f}" if isinstance(sps, (int, float)) else None)
    if r.get("error_line"):
        line("error", f"[red]{_escape(r['error_line'])}[/]")
    history = r.get("history") or []
    if history:
        console.print("[bold]     history[/]")
        for h in history:
            why = f" ({h['reason']})" if h.get("reason") else ""
            console.print(f"              {_fmt_time(h.get('at'))}  {h['state']}{why}", highlight=False)
    line("code", r.get("code"))
    line("image", r.get("image"))
    for key, label in (("rerun_of", "rerun of"), ("resumed_from", "resumed")):
        if r.get(key):
            line(label, r[key])
    if r.get("attempts"):
        from seiscli.launcher.runinfo import attempts_table

        console.print("[bold]    attempts[/]  [dim](attempts.jsonl; `seis show` for versions and nodes)[/]")
        console.print(attempts_table(r["attempts"]))
    attempts = r.get("scheduler_attempts") or []
    if not r.get("attempts") and (len(attempts) > 1 or (attempts and attempts[0].get("source") != r.get("source"))):
        console.print(f"[bold]    attempts[/]  [dim](from {attempts[0].get('source')})[/]")
        for a in attempts:
            code = f" exit {a['exit_code']}" if a.get("exit_code") is not None else ""
            console.print(
                f"              {_fmt_time(a.get('start_time'))}  {a['state']}{code}  {' '.join(a.get('nodes') or [])}",
                highlight=False,
            )
    line("logs", "  ".join(r.get("logs") or []))
    if Path(r["path"], "tensorboard").is_dir():
        line("tensorboard", f"tensorboard --logdir {Path(r['path'], 'tensorboard')}")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# -- logs ------------------------------------------------------------------------------------------------


def _local_rank_dirs(run: Run) -> dict[int, Path]:
    """torchrun's per-rank directories of the latest attempt: logs/ranks/<id>/attempt_<k>/<rank>/."""
    attempts = sorted(run.logs_dir.glob("ranks/*/attempt_*"), key=lambda p: p.stat().st_mtime)
    if not attempts:
        return {}
    return {int(p.name): p for p in attempts[-1].iterdir() if p.name.isdigit()}


def log_files(
    run: Run,
    sub: dict[str, Any] | None = None,
    *,
    rank: int | None = None,
    node: str | None = None,
    all_ranks: bool = False,
    node_list: list[str] | None = None,
) -> list[Path]:
    """The log files that hold what was asked for; only those that exist (yet)."""
    sub = sub if sub is not None else run.submission()
    logs = run.logs_dir
    if sub.get("backend") == "local":
        dirs = _local_rank_dirs(run)
        if rank is None and node is None:
            ranks = sorted(dirs) if all_ranks else []
            files = [logs / "job.out"]
        else:
            ranks = sorted(dirs) if rank is None else [rank]
            files = []
        for k in ranks:
            if k in dirs:
                files += [dirs[k] / "stdout.log", dirs[k] / "stderr.log"]
        return [f for f in files if f.is_file()]
    # Slurm: the batch script's output, and one file per rank written by srun --output=rank-%t.log.
    batch = logs / f"slurm-{sub.get('job_id')}.out"
    rank_files = sorted(logs.glob("rank-*.log"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
    if rank is not None:
        files = [logs / f"rank-{rank}.log"]
    elif node is not None:
        nodes = node_list or []
        per_node = _procs_per_node(run)
        i = nodes.index(node)
        files = [logs / f"rank-{k}.log" for k in range(i * per_node, (i + 1) * per_node)]
    elif all_ranks:
        files = [batch, *rank_files]
    else:
        files = [batch, logs / "rank-0.log"]
    return [f for f in files if f.is_file()]


_PY_ERROR = re.compile(r"^(?:\[\w+\]:)?\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure)\b.*)$")
_SLURM_ERROR = re.compile(r"(error: \*\*\* .*\*\*\*|error: .*)$")


def error_line(run: Run, sub: dict[str, Any] | None = None) -> str | None:
    """The line that says why a run failed: the last exception of the lowest rank that raised one, else the
    scheduler's own error line (time limit, cancellation), else the last line of output."""
    sub = sub if sub is not None else run.submission()
    files = log_files(run, sub, all_ranks=True)
    ranks_first = sorted(files, key=lambda p: (0 if "rank" in p.name or p.parent.name.isdigit() else 1, str(p)))
    for pattern in (_PY_ERROR, _SLURM_ERROR):
        for f in ranks_first:
            for text in reversed(_tail_lines(f, 400)):
                m = pattern.search(text)
                if m:
                    return m.group(1).strip()
    for f in files:
        lines = [t for t in _tail_lines(f, 5) if t.strip()]
        if lines:
            return lines[-1].strip()
    return sub.get("error")


def _tail_lines(path: Path, n: int, block: int = 1 << 16) -> list[str]:
    """The last n lines of a file, read from its end (logs of long runs are large)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = pos = f.tell()
            data = b""
            while pos > 0 and data.count(b"\n") <= n:
                pos = max(0, pos - block)
                f.seek(pos)
                data = f.read(end - pos)
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-n:]


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


class _Follower:
    """Prints what files gain; headers name the file whenever output switches between several."""

    def __init__(self, out: TextIO, multi: bool) -> None:
        self.out, self.multi = out, multi
        self.offsets: dict[Path, int] = {}
        self.last: Path | None = None

    def start(self, path: Path, tail: int | None) -> None:
        """Print the last `tail` complete lines (None: from the start, left to poll)."""
        if tail is None:
            self.offsets[path] = 0
            return
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
        except OSError:
            self.offsets[path] = 0
            return
        lines = _tail_lines(path, tail + 1)
        partial = bool(lines) and size > 0 and not _ends_with_newline(path)
        if partial:
            size -= len(lines.pop().encode())  # an unfinished line waits for poll()
        lines = lines[-tail:] if tail > 0 else []
        if lines:
            self._header(path)
            self.out.write("\n".join(lines) + "\n")
        self.offsets[path] = size

    def _header(self, path: Path) -> None:
        if self.multi and self.last != path:
            self.out.write(f"{'' if self.last is None else chr(10)}==> {path} <==\n")
            self.last = path

    def poll(self, path: Path) -> None:
        if path not in self.offsets:
            self.offsets[path] = 0  # a file that appeared meanwhile (a rank that started): from its start
        try:
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size < self.offsets[path]:
                    self.offsets[path] = 0  # truncated (a requeued attempt rewrote it)
                f.seek(self.offsets[path])
                chunk = f.read(size - self.offsets[path])
        except OSError:
            return
        if not chunk:
            return
        cut = chunk.rfind(b"\n") + 1  # whole lines only, the rest next time
        if cut == 0:
            return
        self._header(path)
        self.out.write(chunk[:cut].decode(errors="replace"))
        self.out.flush()
        self.offsets[path] += cut

    def flush_partial(self, path: Path, *, always_header: bool = False) -> None:
        """Print the rest of the file, an unfinished last line included; `always_header` names an empty file
        too (a rank that printed nothing is still worth seeing listed)."""
        if always_header:
            self._header(path)
        try:
            with path.open("rb") as f:
                f.seek(self.offsets.get(path, 0))
                rest = f.read()
        except OSError:
            return
        if rest:
            self._header(path)
            self.out.write(rest.decode(errors="replace") + ("" if rest.endswith(b"\n") else "\n"))


def show_logs(
    ref: str,
    root: str | Path | None,
    *,
    fail: Callable[[str], Any],
    follow: bool = False,
    rank: int | None = None,
    node: str | None = None,
    tail: int | None = None,
    poll_s: float = 0.5,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print a run's output (all of it, or the last `tail` lines); with `follow`, keep printing until the job
    ends and return its exit status (0 for COMPLETED, non-zero otherwise)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if rank is not None and node is not None:
        fail("--rank and --node: give one of them")
    if rank is not None and rank < 0:
        fail(f"--rank {rank}: ranks start at 0")
    if tail is not None and tail < 0:
        fail(f"--tail {tail}: must be >= 0")
    try:
        run = find_run(ref, root)
    except LookupError as e:
        fail(str(e))
        raise
    sub, st = current_statuses([run])[run.path]
    node_list: list[str] = []
    if node is not None:
        node_list = _node_list(run, sub, st)
        if node not in node_list:
            fail(f"--node {node}: run {run.id} ran on {', '.join(node_list) or 'no node yet'}")

    def files() -> list[Path]:
        return log_files(run, run.submission(), rank=rank, node=node, node_list=node_list)

    found = files()
    if not follow:
        if not found:
            err.write(f"seis: no logs yet for {run.id} ({state_label(st)}) under {run.logs_dir}\n")
            return 0 if st.state != JobState.SUBMIT_FAILED else 1
        f = _Follower(out, multi=len(found) > 1)
        for p in found:
            f.start(p, tail)
            f.flush_partial(p, always_header=True)
        return 0

    f = _Follower(out, multi=rank is None or node is not None)
    for p in found:
        f.start(p, tail)
    label = state_label(st)
    err.write(f"seis: following {run.id} (job {sub.get('job_id')}, {label})\n")
    next_check = 0.0
    while True:
        for p in files():
            f.poll(p)
        if time.monotonic() >= next_check:
            next_check = time.monotonic() + max(poll_s, 1.0)
            sub, st = current_statuses([run])[run.path]
            if state_label(st) != label:
                label = state_label(st)
                err.write(f"seis: {run.id} {label}\n")
            if st.state.finished:
                time.sleep(poll_s)  # the last lines reach the shared file system just after the state
                for p in files():
                    f.poll(p)
                    f.flush_partial(p)
                out.flush()
                return exit_status(st)
        time.sleep(poll_s)


def _node_list(run: Run, sub: dict[str, Any], st: JobStatus) -> list[str]:
    if sub.get("backend") == "local":
        import socket

        return [socket.gethostname()]
    return st.nodes or list(sub.get("node_list") or [])


# -- cancel ----------------------------------------------------------------------------------------------


def cancel_run(
    ref: str, root: str | Path | None, *, fail: Callable[..., Any], console: Console, wait_s: float = 20.0
) -> None:
    from seiscli.launcher.backends import get_backend

    try:
        run = find_run(ref, root)
    except LookupError as e:
        fail(str(e))
        return
    sub, st = current_statuses([run])[run.path]
    if not sub.get("backend") or not sub.get("job_id"):
        fail(f"run {run.id} was never submitted (state {st.state.value})")
    if st.state.finished:
        console.print(f"run {run.id} (job {sub['job_id']}) already ended: {state_label(st)}", highlight=False)
        return
    try:
        get_backend(sub["backend"]).cancel(run)
    except (RuntimeError, ValueError) as e:
        fail(str(e), 1)
    deadline = time.monotonic() + wait_s
    while not st.state.finished and time.monotonic() < deadline:
        time.sleep(0.5)
        sub, st = current_statuses([run])[run.path]
    console.print(f"cancelled {run.id} (job {sub['job_id']}): {state_label(st)}", highlight=False)
