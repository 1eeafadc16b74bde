"""Gathering a run's logs for `seis logs --errors/--grep` (Slurm files or EKS pods) and printing the answer."""

from __future__ import annotations

import json
import re
import time
from typing import TextIO

from seiscli.launcher.errors_scan import (
    AttemptErrors,
    Failure,
    classify,
    grep_lines,
    ledger_exits,
    merge,
    pod_failures,
    read_lines,
    scan_agent,
    scan_rank,
    slurm_failures,
    strip_prefix,
    with_ledger,
)
from seiscli.launcher.runs import Run


def _per_node(run: Run) -> int:
    from seiscli.launcher.jobs import _procs_per_node

    return _procs_per_node(run)


def _pods(run: Run) -> list[tuple[str, str | None, str]]:
    from seiscli.launcher.backends.hyperpod_eks import HyperPodEksBackend

    return HyperPodEksBackend().pod_logs(run)


def run_failures(run: Run) -> list[Failure]:
    sub = run.submission()
    if sub.get("backend") == "hyperpod-eks":
        return with_ledger(pod_failures(_pods(run), _per_node(run)), ledger_exits(run.path))
    if sub.get("backend") == "local":
        found: list[Failure] = []
        for p in sorted(run.logs_dir.glob("ranks/*/attempt_*/*/std*.log")):
            found += scan_rank(read_lines(p), rank=int(p.parent.name), node=None, file=str(p))
        found += scan_agent(read_lines(run.logs_dir / "job.out"), node=None, file=str(run.logs_dir / "job.out"))
        return with_ledger(merge(found, []), ledger_exits(run.path))
    return slurm_failures(run.logs_dir, sub.get("job_id"))


def grep_sources(run: Run) -> list[tuple[str, int | None, list[str]]]:
    """(name, rank, lines) of every log of the run: batch output and each rank, every attempt."""
    if run.submission().get("backend") == "hyperpod-eks":
        per_node = _per_node(run)
        sources: list[tuple[str, int | None, list[str]]] = []
        for i, (pod, _node, text) in enumerate(_pods(run)):
            by_rank: dict[int | None, list[str]] = {}
            for line in text.splitlines():
                local, _ = strip_prefix(line)
                by_rank.setdefault(None if local is None else i * per_node + local, []).append(line)
            sources += [(f"pod/{pod}", r, lines) for r, lines in by_rank.items()]
        return sources
    files = sorted(p for p in run.logs_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out"))
    out: list[tuple[str, int | None, list[str]]] = []
    for p in files:
        m = re.search(r"rank-(\d+)\.log$", p.name)
        rank = int(m.group(1)) if m else int(p.parent.name) if p.parent.name.isdigit() else None
        out.append((str(p.relative_to(run.path)), rank, read_lines(p)))
    return out


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "time unknown"


def print_errors(run: Run, out: TextIO, *, as_json: bool = False) -> int:
    attempts = classify(run_failures(run))
    if as_json:
        data = [
            {
                "attempt": a.attempt,
                "first": a.first.to_json(),
                "consequences": [f.to_json() | {"why": why} for f, why in a.consequences],
            }
            for a in attempts
        ]
        out.write(json.dumps({"run": run.id, "attempts": data}, indent=2) + "\n")
        return 0
    if not attempts:
        out.write(f"no errors found in the logs of {run.id}\n")
        return 0
    first = attempts[0].first
    out.write(f"first error: {_describe(first)}\n")
    for line in first.context or []:
        out.write(f"    {line}\n")
    _consequences(attempts[0], out)
    for a in attempts[1:]:
        out.write(f"\nattempt {a.attempt}: first error: {_describe(a.first)}\n")
        _consequences(a, out)
    return 0


def _describe(f: Failure) -> str:
    exit_ = f" [{f.exit}]" if f.exit and f.exit not in f.text else ""
    where = f"  ({f.file.rsplit('/', 2)[-1]}:{f.line})" if f.file else ""
    return f"{f.rank_text}, attempt {f.attempt}, {_when(f.time)}: {f.text}{exit_}{where}"


def _consequences(a: AttemptErrors, out: TextIO) -> None:
    if not a.consequences:
        return
    out.write("then, as a consequence:\n")
    for f, why in a.consequences:
        out.write(f"  {f.rank_text}: {why}: {f.text[:160]}\n")


def print_grep(run: Run, rx: re.Pattern[str], out: TextIO) -> int:
    """Every matching line of every log, prefixed with its file and line; exit 1 when nothing matched (as grep)."""
    n = 0
    for m in grep_lines(rx, grep_sources(run)):
        who = f"rank {m.rank} " if m.rank is not None else ""
        out.write(f"{who}{m.source}:{m.line}: {m.text}\n")
        n += 1
    return 0 if n else 1
