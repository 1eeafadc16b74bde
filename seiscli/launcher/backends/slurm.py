"""Slurm (and HyperPod's Slurm): thin wrappers over sbatch / squeue / sacct / scontrol / scancel.

Every query takes all job ids at once: `seis status` over a hundred runs costs one squeue call, then one
sacct call for the jobs squeue no longer knows, then one read of the jobcomp log for what is left. Each
source may be missing (no accounting, jobcomp off, job aged out of slurmctld's memory); what none knows
comes back absent and the caller keeps the state it stored last.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from seiscli.launcher.backends.base import JobState, JobStatus, SubmitError
from seiscli.launcher.runs import Run

QUERY_TIMEOUT_S = 20.0
JOBCOMP_TAIL_BYTES = 8 << 20  # the jobcomp log only grows; recent jobs are at its end

# Slurm's job state names (squeue, sacct, scontrol, jobcomp) to the states seis shows.
_STATE_MAP = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "STOPPED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,  # processes ended, epilog still running: the outcome is not known yet
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "REQUEUED": JobState.REQUEUED,
    "REQUEUE_FED": JobState.REQUEUED,
    "REQUEUE_HOLD": JobState.REQUEUED,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
    "DEADLINE": JobState.TIMEOUT,
    "NODE_FAIL": JobState.NODE_FAIL,
    "BOOT_FAIL": JobState.NODE_FAIL,
    "PREEMPTED": JobState.PREEMPTED,
    "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
}


def map_state(raw: str, restarts: int = 0) -> JobState:
    """`CANCELLED by 0` -> CANCELLED; a job pending again after a requeue -> REQUEUED."""
    word = raw.split()[0].rstrip("+").upper() if raw.strip() else ""
    state = _STATE_MAP.get(word, JobState.UNKNOWN)
    if state == JobState.PENDING and restarts > 0:
        return JobState.REQUEUED
    return state


def expand_hostlist(text: str) -> list[str]:
    """`node[1-3,7],gpu-a[01-02]` -> node1 node2 node3 node7 gpu-a01 gpu-a02 (as `scontrol show hostnames`)."""
    names: list[str] = []
    for part in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", text.strip()):
        if part in ("", "(null)", "None"):
            continue
        m = re.search(r"\[([^\]]*)\]", part)
        if not m:
            names.append(part)
            continue
        head, tail = part[: m.start()], part[m.end() :]
        for item in m.group(1).split(","):
            lo, _, hi = item.partition("-")
            width = len(lo) if lo.startswith("0") else 0
            for i in range(int(lo), int(hi or lo) + 1):
                names.extend(expand_hostlist(f"{head}{i:0{width}d}{tail}"))
    return names


def parse_duration(text: str) -> float | None:
    """Slurm's `[D-]HH:MM:SS`, `MM:SS` or seconds -> seconds."""
    text = text.strip()
    if not text or text in ("INVALID", "N/A", "UNLIMITED"):
        return None
    days, _, clock = text.rpartition("-")
    try:
        parts = [float(p) for p in clock.split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        return secs + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None  # Unknown, None, N/A


def _exit_pair(text: str) -> tuple[int | None, int | None]:
    """`3:0` (exit code : signal), as sacct, scontrol and jobcomp write it."""
    code, _, sig = text.strip().partition(":")
    try:
        return int(code), (int(sig) or None) if sig else None
    except ValueError:
        return None, None


def _wait_status(text: str) -> tuple[int | None, int | None]:
    """squeue's `exit_code` is the raw wait status: 768 -> exit 3; 15 -> signal 15."""
    try:
        raw = int(text)
    except ValueError:
        return None, None
    return raw >> 8 & 0xFF, (raw & 0x7F) or None


@dataclass
class SlurmCommand:
    """The result of one Slurm client call; `missing` when the tool is not installed."""

    rc: int
    out: str
    err: str
    missing: bool = False


def run_slurm(args: list[str], *, timeout: float = QUERY_TIMEOUT_S, cwd: Path | None = None) -> SlurmCommand:
    exe = shutil.which(args[0])
    if exe is None:
        return SlurmCommand(127, "", f"{args[0]}: not found on PATH", missing=True)
    try:
        p = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return SlurmCommand(124, "", f"{args[0]} did not answer in {timeout:.0f} s")
    return SlurmCommand(p.returncode, p.stdout, p.stderr)


# -- the sources, each asked once for many jobs ----------------------------------------------------------

_SQUEUE_FIELDS = (
    "JobID",
    "State",
    "Reason",
    "exit_code",
    "RestartCnt",
    "NumNodes",
    "NodeList",
    "TimeUsed",
    "StartTime",
    "EndTime",
)


def query_squeue(ids: Iterable[str]) -> dict[str, JobStatus]:
    """Jobs slurmctld still holds (pending, running, and finished within MinJobAge)."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    fmt = ",".join(f"{f}:|" for f in _SQUEUE_FIELDS)
    res = run_slurm(["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}", f"--Format={fmt}"])
    if res.rc != 0:
        if "Invalid job id" not in res.err:  # (that one only means it knows none of them)
            # No controller, or not a login node: say so once; the other sources may still answer.
            print(f"seis: warning: squeue failed: {res.err.strip() or res.rc}", file=sys.stderr)
        return {}
    found: dict[str, JobStatus] = {}
    for line in res.out.splitlines():
        cols = line.split("|")
        if len(cols) < len(_SQUEUE_FIELDS):
            continue
        job, raw, reason, wait, restarts, nnodes, nodelist, used, start, end = (
            c.strip() for c in cols[: len(_SQUEUE_FIELDS)]
        )
        if job not in ids:
            continue  # array or het-job components
        n_restart = int(restarts) if restarts.isdigit() else 0
        state = map_state(raw, n_restart)
        code, sig = _wait_status(wait) if state.finished else (None, None)
        found[job] = JobStatus(
            state=state,
            reason=None if reason in ("None", "") else reason,
            exit_code=code,
            nodes=expand_hostlist(nodelist) if state != JobState.PENDING else [],
            elapsed_s=parse_duration(used),
            source="squeue",
            restarts=n_restart,
            signal=sig,
            node_count=int(nnodes) if nnodes.isdigit() else None,
            start_time=parse_time(start) if state not in (JobState.PENDING, JobState.REQUEUED) else None,
            end_time=parse_time(end) if state.finished else None,
            raw_state=raw,
        )
    return found


_SACCT_FIELDS = ("JobIDRaw", "State", "ExitCode", "Reason", "NNodes", "NodeList", "ElapsedRaw", "Start", "End")


def query_sacct(ids: Iterable[str]) -> dict[str, list[JobStatus]] | None:
    """Accounting records, every attempt of a requeued job in order; None when accounting is off."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    fmt = ",".join(_SACCT_FIELDS)
    res = run_slurm(["sacct", "-nPXD", f"--jobs={','.join(ids)}", f"--format={fmt}"])
    if res.rc != 0 or "accounting storage is disabled" in (res.out + res.err):
        return None
    found: dict[str, list[JobStatus]] = {}
    for line in res.out.splitlines():
        cols = line.split("|")
        if len(cols) != len(_SACCT_FIELDS) or cols[0] not in ids:
            continue
        job, raw, exit_pair, reason, nnodes, nodelist, elapsed, start, end = cols
        code, sig = _exit_pair(exit_pair)
        state = map_state(raw)
        found.setdefault(job, []).append(
            JobStatus(
                state=state,
                reason=None if reason in ("None", "") else reason,
                exit_code=code if state.finished else None,
                signal=sig,
                nodes=expand_hostlist(nodelist) if nodelist not in ("None assigned", "") else [],
                elapsed_s=float(elapsed) if elapsed.isdigit() else None,
                source="sacct",
                node_count=int(nnodes) if nnodes.isdigit() else None,
                start_time=parse_time(start),
                end_time=parse_time(end),
                raw_state=raw,
            )
        )
    for rows in found.values():
        # Each requeue leaves its attempt recorded as REQUEUED; the live one then reads PENDING.
        rows[-1].restarts = sum(1 for r in rows[:-1] if r.state == JobState.REQUEUED)
        if rows[-1].restarts and rows[-1].state == JobState.PENDING:
            rows[-1].state = JobState.REQUEUED
    return found


def slurm_conf_value(key: str) -> str | None:
    """A value from slurm.conf as the client tools read it ($SLURM_CONF, else /etc/slurm/slurm.conf)."""
    path = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    value = None
    for line in text.splitlines():
        k, sep, v = line.split("#", 1)[0].strip().partition("=")
        if sep and k.strip().lower() == key.lower():
            value = v.strip()
    return value


def jobcomp_path() -> Path | None:
    if (slurm_conf_value("JobCompType") or "").lower() != "jobcomp/filetxt":
        return None
    loc = slurm_conf_value("JobCompLoc")
    return Path(loc) if loc else None


_KV = re.compile(r"(\w+)=(.*?)(?= \w+=|\s*$)")


def query_jobcomp(ids: Iterable[str], path: Path | None = None) -> dict[str, list[JobStatus]]:
    """The jobcomp/filetxt log: one line per finished job (and per requeue). Readable long after MinJobAge."""
    ids = set(ids)
    path = path or jobcomp_path()
    if not ids or path is None:
        return {}
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - JOBCOMP_TAIL_BYTES))
            text = f.read().decode(errors="replace")
    except OSError:
        return {}
    found: dict[str, list[JobStatus]] = {}
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        rec = dict(_KV.findall(line))
        job = rec.get("JobId", "")
        if job not in ids:
            continue
        start, end = parse_time(rec.get("StartTime", "")), parse_time(rec.get("EndTime", ""))
        code, sig = _exit_pair(rec.get("ExitCode", ""))
        # jobcomp logs a requeue as a line with JobState=PENDING: that attempt ended and the job went back.
        state = map_state(rec.get("JobState", ""), restarts=1)
        found.setdefault(job, []).append(
            JobStatus(
                state=state,
                exit_code=code if state.finished else None,
                signal=sig,
                nodes=expand_hostlist(rec.get("NodeList", "")),
                elapsed_s=end - start if start and end else None,
                source="jobcomp",
                node_count=int(rec["NodeCnt"]) if rec.get("NodeCnt", "").isdigit() else None,
                start_time=start,
                end_time=end,
                raw_state=rec.get("JobState", ""),
            )
        )
    for rows in found.values():
        rows[-1].restarts = sum(1 for r in rows[:-1] if r.state == JobState.REQUEUED)
    return found


def query_jobs(ids: Iterable[str]) -> dict[str, JobStatus]:
    """The best current answer for every job any source knows: squeue, then sacct, then the jobcomp log."""
    todo = set(ids)
    found = query_squeue(todo)
    todo -= found.keys()
    if todo:
        acct = query_sacct(todo)
        for job, rows in (acct or {}).items():
            found[job] = rows[-1]
        todo -= found.keys()
    if todo:
        for job, rows in query_jobcomp(todo).items():
            found[job] = rows[-1]
    return found


def job_attempts(job_id: str) -> list[JobStatus]:
    """Every run of one job (requeues included), from accounting or else the jobcomp log."""
    acct = query_sacct([job_id])
    if acct is not None and acct.get(job_id):
        return acct[job_id]
    return query_jobcomp([job_id]).get(job_id, [])


# -- the backend ----------------------------------------------------------------------------------------


class SlurmBackend:
    name = "slurm"

    def submit(self, run: Run) -> str:
        script = run.path / (run.submission().get("script") or "job.sbatch")
        res = run_slurm(["sbatch", "--parsable", str(script)], cwd=run.path, timeout=60)
        if res.missing:
            raise SubmitError("sbatch not found on PATH: submit from a Slurm login node, or use --backend local")
        if res.rc != 0:
            raise SubmitError(res.err.strip() or res.out.strip() or f"sbatch exited with status {res.rc}")
        job_id = res.out.strip().split(";")[0]  # `<id>[;<cluster>]`
        if not job_id.isdigit():
            raise SubmitError(f"sbatch printed no job id: {res.out.strip()!r} {res.err.strip()}")
        now = time.time()
        history = [{"state": JobState.PENDING.value, "at": now, "source": "sbatch"}]
        run.update_submission(job_id=job_id, submitted=now, state=JobState.PENDING.value, history=history)
        return job_id

    def statuses(self, runs: list[Run]) -> dict[Path, JobStatus]:
        """Every run's job in one round of queries; runs no source knows are left out."""
        by_job = {str(r.submission().get("job_id")): r for r in runs if r.submission().get("job_id")}
        found = query_jobs(by_job)
        return {by_job[job].path: st for job, st in found.items()}

    def status(self, run: Run) -> JobStatus:
        st = self.statuses([run]).get(run.path)
        if st is not None:
            return st
        sub = run.submission()
        return JobStatus(state=JobState(sub.get("state", "UNKNOWN")), exit_code=sub.get("exit_code"), source="stored")

    def cancel(self, run: Run) -> None:
        job_id = run.submission().get("job_id")
        if not job_id:
            raise RuntimeError(f"run {run.id} has no job id")
        res = run_slurm(["scancel", str(job_id)])
        if res.rc != 0:
            raise RuntimeError(f"scancel {job_id}: {res.err.strip() or f'exit status {res.rc}'}")

    def details(self, run: Run) -> dict[str, Any]:
        job_id = str(run.submission().get("job_id") or "")
        if not job_id:
            return {}
        return {"attempts": [a.to_json() for a in job_attempts(job_id)]}
