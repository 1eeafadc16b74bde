"""The files a job writes about itself in its run directory: the attempt ledger, provenance, and the exit
codes the job script's retry policy acts on. Shared by the job script (which renders RETRY_CODES), the trainer
(rank 0 writes provenance and its own ledger line) and the launcher (`seis status`, `show`, `rerun`), and by
readers on other branches (logs --errors, top, report). No torch, no numpy, no pydantic: stdlib only.

Layout (beside recipe.yaml, submission.json, metrics.jsonl of seiscli/launcher/runs.py):

  attempts.jsonl               the attempt ledger: append-only, one JSON object per line, each with "event":
    {"event": "start", "attempt": 1, "job_id": "17", "restart_count": 0, "nodes": ["node1"],
     "host": "node1", "time": 1764680000.1, "source": "job"}          job script, before the training step
    {"event": "trainer", "attempt": 1, "job_id": "17", "first_step": 1, "resumed_from": null | "<ckpt dir>",
     "recipe_changes": ["train.steps 1500 -> 3000", ...],
     "world_size": 4, "nodes": [...], "time": ...}                      trainer rank 0, after resuming
    {"event": "end", "attempt": 1, "job_id": "17", "time": ..., "exit_code": 3, "signal": null,
     "last_step": 40, "action": "requeue" | "requeued" | "done" | "stop" | "signalled", "retries": 1,
     "why": "communication failure"}                                   job script, after the training step
    {"event": "rank_exit", "attempt": 1, "time": ..., "rank": 3, "exit_code": 3, "host": "node2"}
                                                                        a trainer process exiting non-zero
    {"event": "requeued_self", "attempt": 1, "time": ...}               trainer rank 0, after its USR1 requeue
  "action": requeue = the job script requeued the job after a failure; requeued = the trainer requeued itself
  after Slurm's USR1 warning (not counted against cluster.max_retries); done = finished; stop = failed and not
  retried; signalled = the batch script got SIGTERM (time limit, preemption, scancel).
  A start without an end is an attempt that is running, or whose batch script was killed (node lost, time
  limit): readers show its end as unknown. Several "trainer" lines within one attempt are restarts of the
  training step inside the allocation (HyperPod auto-resume); `read_attempts` counts them as step_restarts.

  provenance/launch.json       written by `seis launch` on the submitting host: git commit, dirty flag, the
                               patch's file name, container image and digest, seis version, argv
  provenance/git.patch         uncommitted changes of the code the job runs (tracked and untracked files)
  provenance/attempt-<k>.json  written by trainer rank 0 at the start of attempt k: Python and package
                               versions, torch / CUDA / cuDNN / NCCL, driver, GPUs, node list as seen by the job
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ATTEMPTS_FILE = "attempts.jsonl"
PROVENANCE_DIR = "provenance"
LAUNCH_PROVENANCE = "launch.json"
GIT_PATCH = "git.patch"
FORMAT = 1

# -- exit codes of `python -m seiscli.train`, and what the job script does with each -------------------------
EXIT_OK = 0  # finished, or checkpointed and requeued itself after Slurm's USR1 warning
EXIT_FAILED = 1  # any other exception: a bug or bad data that a restart would meet again
EXIT_USAGE = 2  # configuration error: the recipe, the launch, or a checkpoint this run cannot resume from
EXIT_COMM = 3  # communication failure: NCCL/gloo error or timeout, a peer rank or its node gone
EXIT_LOADER = 4  # a data-loader worker was killed (the kernel's OOM killer, most often)

# Codes a restart can cure: the job script requeues the job (bounded by cluster.max_retries).
RETRY_CODES: dict[int, str] = {
    EXIT_COMM: "communication failure (NCCL/gloo error or timeout, lost peer)",
    EXIT_LOADER: "a data-loader worker was killed (OOM killer)",
}
# And 128 + N: a rank was ended by signal N (SIGKILL by the OOM killer, SIGSEGV, SIGBUS, SIGABRT...), or srun
# ended the step that way. Never retried: 0 (finished), 1 (a failure a restart meets again), 2 (configuration).
NEVER_RETRY: dict[int, str] = {
    EXIT_OK: "finished (or requeued itself after the USR1 warning)",
    EXIT_FAILED: "failed: an error a restart would meet again",
    EXIT_USAGE: "configuration error",
}
SIGNAL_CODES_FROM = 129  # 128 + signal number


def retry_reason(code: int) -> str | None:
    """Why the job script requeues after the training step exited with `code`; None: it does not."""
    if code in RETRY_CODES:
        return RETRY_CODES[code]
    if SIGNAL_CODES_FROM <= code <= 128 + 64:
        return f"a rank was ended by signal {code - 128}"
    return None


# -- files -------------------------------------------------------------------------------------------------


def provenance_dir(run_dir: Path) -> Path:
    return Path(run_dir) / PROVENANCE_DIR


def attempt_provenance_path(run_dir: Path, attempt: int) -> Path:
    return provenance_dir(run_dir) / f"attempt-{attempt}.json"


def append_event(run_dir: Path, event: dict[str, Any]) -> None:
    """One line, written with one write() on an O_APPEND descriptor: lines of concurrent writers never mix.
    Keys keep their order ("event" first): the job script finds lines with grep and sed."""
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(Path(run_dir) / ATTEMPTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def rank_exit_event(attempt: int, rank: int, exit_code: int, host: str, at: float) -> dict[str, Any]:
    """What a trainer process appends when it exits non-zero, in the key order the job script's sed reads."""
    return {"event": "rank_exit", "attempt": attempt, "time": at, "rank": rank, "exit_code": exit_code, "host": host}


def current_attempt(environ: dict[str, str] | None = None) -> int:
    """The attempt the job script exported (SEIS_ATTEMPT); 1 where no script counts (local runs, tests)."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("SEIS_ATTEMPT") or 1))
    except ValueError:
        return 1


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    try:
        text = (Path(run_dir) / ATTEMPTS_FILE).read_text(errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a killed writer
        if isinstance(ev, dict) and "event" in ev:
            events.append(ev)
    return events


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    """One row per attempt, its start, trainer and end lines merged, in order. Keys: attempt, job_id,
    restart_count, nodes, start_time, end_time, exit_code, signal, first_step, last_step, resumed_from,
    recipe_changes (training fields changed since that checkpoint, `train.steps 1500 -> 3000`),
    action, why, retries, step_restarts (0 when the training step ran once), failed_ranks (rank, exit_code,
    host, time of each rank that exited non-zero, earliest first)."""
    rows: dict[int, dict[str, Any]] = {}
    for ev in read_events(run_dir):
        k = int(ev.get("attempt") or 0)
        row = rows.setdefault(
            k,
            {
                "attempt": k,
                "job_id": None,
                "restart_count": None,
                "nodes": [],
                "start_time": None,
                "end_time": None,
                "exit_code": None,
                "signal": None,
                "first_step": None,
                "last_step": None,
                "resumed_from": None,
                "recipe_changes": [],
                "action": None,
                "why": None,
                "retries": None,
                "step_restarts": 0,
                "failed_ranks": [],
            },
        )
        kind = ev["event"]
        row["job_id"] = row["job_id"] or ev.get("job_id")
        if kind == "start":
            row |= {k2: ev.get(k2) for k2 in ("restart_count",)}
            row["nodes"] = ev.get("nodes") or row["nodes"]
            row["start_time"] = ev.get("time")
        elif kind == "trainer":
            if row["first_step"] is not None:
                row["step_restarts"] += 1
            else:
                row["first_step"] = ev.get("first_step")
                row["resumed_from"] = ev.get("resumed_from")
                row["recipe_changes"] = ev.get("recipe_changes") or []
            row["nodes"] = row["nodes"] or ev.get("nodes") or []
            row["start_time"] = row["start_time"] or ev.get("time")
        elif kind == "rank_exit":
            row["failed_ranks"].append({key: ev.get(key) for key in ("rank", "exit_code", "host", "time")})
        elif kind == "end":
            for key in ("exit_code", "signal", "last_step", "action", "why", "retries"):
                row[key] = ev.get(key)
            row["end_time"] = ev.get("time")
    for row in rows.values():
        row["failed_ranks"].sort(key=lambda r: r.get("time") or 0)
    return [rows[k] for k in sorted(rows)]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
