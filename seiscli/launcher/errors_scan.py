"""`seis logs RUN --errors` and `--grep`: which rank failed first, and which only failed because it did.

A 128-rank job that dies leaves 128 logs, most of them ending in a communication error ("Connection closed by
peer", an NCCL watchdog timeout) that only says some *other* rank went away. What a person needs is the first
failure. Sources, all plain text (no scheduler call is needed once the logs exist):

- each rank's log (Slurm: logs/rank-<r>.log, appended across attempts; EKS: the pod's lines prefixed
  `[default<k>]:`). The trainer stamps them: `seis: rank R on NODE started|failed at ISO-TIME (attempt K)`.
- the batch script's output (Slurm): `seis: job N ... (restart K)` opens attempt K; srun writes one
  `srun: error: NODE: task T: Killed|Exited with exit code C` line per task, in the order the tasks ended, and
  `_step_signal: Terminating StepId` when --kill-on-bad-exit starts killing the others.
- torchrun's failure summary (EKS, local), which names rank, exit code and time of the first failed child.

Ordering, per attempt: a real error (an exception other than a communication error, a process killed from
outside, an OOM) beats a communication error, which beats a rank killed by the launcher; among equals, srun's
task-end order when both have one, else the time stamp, else the rank.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

CONTEXT_LINES = 12  # traceback lines kept with a failure

# A rank's line as torchrun (`[default3]:`) or PyTorch's logger (`[rank3]:`) prefixes it.
_PREFIX = re.compile(r"^\[(?:default|rank)(\d+)\]:")
_MARK = re.compile(r"seis: rank (\d+) on (\S+) (started|failed) at (\S+) \(attempt (\d+)\)")
# `seis: job 7 attempt 2 on node[1-2] (restart 1), ...` (older scripts: no `attempt K`)
_BATCH_ATTEMPT = re.compile(r"^seis: job \d+ (?:attempt (\d+) )?on .*\(restart (\d+)\)")
_SRUN_TASK = re.compile(r"^srun: error: (\S+): tasks? ([\d,\-]+): (.+)$")
_SRUN_KILLING = re.compile(r"^srun: launch/slurm: _step_signal: Terminating StepId")
_STEPD = re.compile(r"slurmstepd(?:-\S+)?: error: \*\*\* (STEP|JOB) (\S+) ON (\S+) CANCELLED AT (\S+)(.*?)\*\*\*")
_OOM = re.compile(r"slurmstepd(?:-\S+)?: error: Detected \d+ oom[_-]kill event")
_TRACEBACK = "Traceback (most recent call last):"
_EXC = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Failure|Warning)\b.*)$")
_ERROR_WORD = re.compile(r"\berror:\s|\bFatal Python error\b|\[E\d{4} ")
_ISO = re.compile(r"(\d{4}-\d{2}-\d{2})[ T_](\d{2}:\d{2}:\d{2})(?:[.,](\d+))?([+-]\d{2}:?\d{2}|Z)?")
_GLOG = re.compile(r"\[[EWIF](\d{2})(\d{2}) (\d{2}):(\d{2}):(\d{2})\.(\d+)")
# torchrun's ChildFailedError summary: `rank : 1 (local_rank: 1)`, `exitcode : -9 (pid: 42)`, `time : ...`
_TR_RANK = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank")
_TR_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
_TR_TIME = re.compile(r"^\s*time\s*:\s*(\S+)")
# What a rank says when *another* rank went away: the symptom, not the cause.
PEER = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|remote worker crash|Watchdog caught collective"
    r"|collective operation timeout|NCCL communicator was aborted|ncclRemoteError|remote process exited"
    r"|DistNetworkError|DistBackendError|recvValue|Socket Timeout|Timed out waiting for|timed out after.*collective"
    r"|TCPStore.*(?:closed|reset|failed)|Connection refused",
    re.I,
)


@dataclass
class Failure:
    rank: int | None  # None: the job or a whole node (time limit, OOM event)
    node: str | None
    attempt: int
    text: str
    kind: str = "error"  # error | peer (a collective lost its peer) | killed (by the launcher) | cancelled
    time: float | None = None
    exit: str | None = None  # how the process ended, as srun/torchrun says it
    exit_order: int | None = None  # place among srun's task-end lines of its attempt
    file: str = ""
    line: int = 0
    context: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def rank_text(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "job"
        return who + (f" on {self.node}" if self.node else "")


@dataclass
class AttemptErrors:
    attempt: int
    first: Failure
    consequences: list[tuple[Failure, str]]  # each with why it counts as a consequence


def parse_time(text: str, year: int | None = None) -> float | None:
    """An ISO time (naive = local, as Slurm writes it) or a glog stamp (`E1202 14:46:09.12`, no year)."""
    m = _ISO.search(text)
    if m:
        frac = f".{m.group(3)[:6]}" if m.group(3) else ""
        tz = m.group(4) or ""
        tz = "+00:00" if tz == "Z" else tz
        try:
            return datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}{frac}{tz}").timestamp()
        except ValueError:
            return None
    m = _GLOG.search(text)
    if m:
        mo, d, hh, mi, ss, us = (int(x) for x in m.groups()[:5]) + (int(m.group(6)[:6].ljust(6, "0")),)
        return datetime(year or datetime.now().year, mo, d, hh, mi, ss, us).timestamp()
    return None


def strip_prefix(line: str) -> tuple[int | None, str]:
    m = _PREFIX.match(line)
    return (int(m.group(1)), line[m.end() :]) if m else (None, line)


def scan_rank(lines: list[str], *, rank: int, node: str | None, file: str, year: int | None = None) -> list[Failure]:
    """Every failure in one rank's log, one per attempt (its first error), with the attempt and time stamp
    from the trainer's `seis: rank ...` lines."""
    found: list[Failure] = []
    attempt = 1  # attempts count from 1, as the ledger (attempts.jsonl) numbers them
    current: Failure | None = None  # this attempt's failure so far
    tb: list[str] | None = None  # an open traceback
    last_time: float | None = None

    def close() -> None:
        nonlocal current
        if current is not None:
            found.append(current)
            current = None

    for i, raw in enumerate(lines, 1):
        _, line = strip_prefix(raw.rstrip("\n"))
        m = _MARK.search(line)
        if m:
            node = node or m.group(2)
            t = parse_time(m.group(4))
            if m.group(3) == "started":
                close()
                attempt = int(m.group(5))
            else:
                attempt = int(m.group(5))
                if current is None:
                    current = Failure(rank, m.group(2), attempt, "failed (no error text)", file=file, line=i)
                current.attempt, current.node = attempt, m.group(2)
                current.time = t if current.time is None or (t is not None and t < current.time) else current.time
            last_time = t or last_time
            continue
        if line.startswith(_TRACEBACK):
            tb = [line]
            continue
        if tb is not None:
            tb.append(line)
            if _EXC.match(line):
                if current is None:
                    current = Failure(rank, node, attempt, line.strip(), file=file, line=i, context=tb[-CONTEXT_LINES:])
                tb = None
            elif len(tb) > 400:
                tb = None
            continue
        stepd = _STEPD.search(line)
        if stepd:
            if current is None:
                current = Failure(rank, node or stepd.group(3), attempt, line.strip(), "cancelled", file=file, line=i)
                current.time = parse_time(stepd.group(4))
            continue
        if _ERROR_WORD.search(line) and current is None:
            t = parse_time(line, year)
            current = Failure(rank, node, attempt, line.strip(), file=file, line=i, time=t)
        elif current is None:
            last_time = parse_time(line, year) or last_time
    close()
    for f in found:
        if f.kind == "error" and PEER.search(f.text + "\n" + "\n".join(f.context)):
            f.kind = "peer"
    return found


@dataclass
class TaskEnd:
    rank: int
    node: str
    attempt: int
    what: str
    order: int
    after_kill: bool  # srun was already killing the step (--kill-on-bad-exit) when this task ended


def scan_batch(lines: list[str], *, file: str) -> tuple[list[TaskEnd], list[Failure]]:
    """srun's task-end lines (in the order the tasks ended, per attempt) and job-level events."""
    ends: list[TaskEnd] = []
    jobs: list[Failure] = []
    attempt, order, killing = 1, 0, False
    for i, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        m = _BATCH_ATTEMPT.match(line)
        if m:
            attempt, order, killing = int(m.group(1) or int(m.group(2)) + 1), 0, False
            continue
        if _SRUN_KILLING.match(line):
            killing = True
            continue
        m = _SRUN_TASK.match(line)
        if m:
            for rank in _expand(m.group(2)):
                ends.append(TaskEnd(rank, m.group(1), attempt, m.group(3).strip(), order, killing))
            order += 1
            continue
        m = _STEPD.search(line)
        if m and m.group(1) == "JOB":
            jobs.append(
                Failure(None, m.group(3), attempt, line.strip(), "cancelled", parse_time(m.group(4)), file=file, line=i)
            )
        elif _OOM.search(line):
            jobs.append(Failure(None, None, attempt, line.strip(), "error", file=file, line=i))
    return ends, jobs


def scan_agent(lines: list[str], *, node: str | None, file: str) -> list[Failure]:
    """torchrun's ChildFailedError summary: one block per failed child (`[k]:` then time, host, rank, exitcode)."""
    found: list[Failure] = []
    block: dict[str, str] = {}

    def emit(i: int) -> None:
        if "rank" in block and "exit" in block:
            code = block["exit"]
            what = f"signal {-int(code)}" if code.startswith("-") else f"exit code {code}"
            f = Failure(int(block["rank"]), node, 1, f"process ended: {what}", file=file, line=i, exit=what)
            f.time = parse_time(block.get("time", "").replace("_", "T"))
            found.append(f)
        block.clear()

    for i, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if re.match(r"^\[\d+\]:\s*$", line) or line.startswith(("====", "----")):
            emit(i)
        elif m := _TR_RANK.match(line):
            block["rank"] = m.group(1)
        elif m := _TR_EXIT.match(line):
            block["exit"] = m.group(1)
        elif m := _TR_TIME.match(line):
            block["time"] = m.group(1)
    emit(len(lines))
    return found


def _expand(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def merge(failures: Iterable[Failure], ends: Iterable[TaskEnd]) -> list[Failure]:
    """One record per (attempt, rank): the rank's own error, completed with how srun saw its process end."""
    by_key: dict[tuple[int, int | None], Failure] = {}
    extra: list[Failure] = []
    for f in failures:
        if f.rank is None:
            extra.append(f)
            continue
        key = (f.attempt, f.rank)
        old = by_key.get(key)
        if old is None:
            by_key[key] = f
            continue
        # The rank's own words win over a launcher's summary of how it ended; that summary fills the gaps.
        own, other = (f, old) if old.text.startswith("process ended:") else (old, f)
        if own is old and not f.text.startswith("process ended:") and (f.time or 1e300) < (old.time or 1e300):
            own, other = f, old  # two errors of the rank itself: the earlier one
        own.exit = own.exit or other.exit
        own.time = own.time if own.time is not None else other.time
        own.node = own.node or other.node
        by_key[key] = own
    for e in ends:
        f = by_key.get((e.attempt, e.rank))
        if f is None:
            # No word from the process itself: killed from outside (OOM killer, a signal) or by srun.
            kind = "killed" if e.after_kill else "error"
            f = by_key[(e.attempt, e.rank)] = Failure(e.rank, e.node, e.attempt, f"srun: {e.what}", kind)
        f.node = f.node or e.node
        f.exit, f.exit_order = e.what, e.order
        if e.after_kill and f.kind == "error" and f.text.startswith("srun:"):
            f.kind = "killed"
    return sorted([*by_key.values(), *extra], key=lambda f: (f.attempt, f.rank if f.rank is not None else -1))


_RANK_OF_KIND = {"error": 0, "peer": 1, "cancelled": 2, "killed": 3}


def _before(a: Failure, b: Failure) -> int:
    ka, kb = _RANK_OF_KIND.get(a.kind, 9), _RANK_OF_KIND.get(b.kind, 9)
    if ka != kb:
        return ka - kb
    if a.exit_order is not None and b.exit_order is not None and a.exit_order != b.exit_order:
        return a.exit_order - b.exit_order
    if a.time is not None and b.time is not None and a.time != b.time:
        return -1 if a.time < b.time else 1
    if (a.time is None) != (b.time is None):
        return -1 if a.time is not None else 1
    return (a.rank if a.rank is not None else -1) - (b.rank if b.rank is not None else -1)


def classify(failures: list[Failure]) -> list[AttemptErrors]:
    """Per attempt: the first failure and the others, each with why it is a consequence of the first."""
    result = []
    for attempt in sorted({f.attempt for f in failures}):
        group = sorted((f for f in failures if f.attempt == attempt), key=functools.cmp_to_key(_before))
        first, rest = group[0], group[1:]
        why = {
            "peer": "lost its peer (a collective failed because another rank went away)",
            "killed": "killed by the launcher after the first failure",
            "cancelled": "cancelled with the job step",
            "error": "failed after the first failure",
        }
        result.append(AttemptErrors(attempt, first, [(f, why.get(f.kind, f.kind)) for f in rest]))
    return result


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


_RANK_FILE = re.compile(r"rank-(\d+)\.log$")


def ledger_exits(run_dir: Path) -> list[Failure]:
    """The ledger's `rank_exit` lines (seiscli/run_layout.py): a time and an exit code for every rank that exited
    non-zero on its own; exit code 3 is the trainer's word for a communication failure."""
    from seiscli.run_layout import EXIT_COMM, read_events

    found = []
    for e in read_events(run_dir):
        if e.get("event") != "rank_exit" or not isinstance(e.get("rank"), int):
            continue
        code = e.get("exit_code")
        kind = "peer" if code == EXIT_COMM else "error"
        f = Failure(e["rank"], e.get("host"), int(e.get("attempt") or 1), f"exited with code {code}", kind)
        f.time, f.file = e.get("time"), "attempts.jsonl"
        found.append(f)
    return found


def with_ledger(failures: list[Failure], exits: list[Failure]) -> list[Failure]:
    """Fill in time and node from the ledger where a rank's log did not stamp them; add ranks only it knows."""
    by_key = {(f.attempt, f.rank): f for f in failures}
    for e in exits:
        f = by_key.get((e.attempt, e.rank))
        if f is None:
            failures.append(e)
            continue
        f.time = f.time if f.time is not None else e.time
        f.node = f.node or e.node
        if e.kind == "peer" and f.kind == "error" and f.text.startswith("srun:"):
            f.kind = "peer"
    return failures


def slurm_failures(logs: Path, job_id: str | None) -> list[Failure]:
    """Every failure recorded under a Slurm run's logs/ directory (and the run's ledger beside it)."""
    failures: list[Failure] = []
    for p in logs.glob("rank-*.log"):
        m = _RANK_FILE.search(p.name)
        if m:
            year = _year(p)
            failures += scan_rank(read_lines(p), rank=int(m.group(1)), node=None, file=str(p), year=year)
    ends: list[TaskEnd] = []
    for p in sorted(logs.glob("slurm-*.out")):
        e, jobs = scan_batch(read_lines(p), file=str(p))
        ends += e
        failures += jobs
    return with_ledger(merge(failures, ends), ledger_exits(logs.parent))


def pod_failures(pods: list[tuple[str, str | None, str]], per_node: int) -> list[Failure]:
    """EKS/torchrun: (pod name, node, log text) per pod, in pod order; rank = pod index x per_node + local rank."""
    failures: list[Failure] = []
    for i, (pod, node, text) in enumerate(pods):
        per_rank: dict[int, list[str]] = {}
        agent: list[str] = []
        for line in text.splitlines():
            local, rest = strip_prefix(line)
            if local is None:
                agent.append(line)
            else:
                per_rank.setdefault(local, []).append(rest)
        for local, lines in per_rank.items():
            failures += scan_rank(lines, rank=i * per_node + local, node=node, file=f"pod/{pod}")
        failures += scan_agent(agent, node=node, file=f"pod/{pod}")
    return merge(failures, [])


def _year(path: Path) -> int | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime).year
    except OSError:
        return None


# -- grep --------------------------------------------------------------------------------------------------


@dataclass
class Match:
    source: str  # rank-3.log, slurm-12.out, pod/<name>
    rank: int | None
    line: int
    text: str


def grep_lines(pattern: re.Pattern[str], sources: Iterable[tuple[str, int | None, list[str]]]) -> Iterator[Match]:
    for source, rank, lines in sources:
        for i, raw in enumerate(lines, 1):
            if pattern.search(raw):
                yield Match(source, rank, i, raw)
