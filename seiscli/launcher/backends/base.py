"""What every backend offers the CLI, and the job states users see."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from seiscli.launcher.runs import Run


class JobState(str, enum.Enum):
    CREATED = "CREATED"  # run directory written, nothing submitted yet
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    REQUEUED = "REQUEUED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    SUBMIT_FAILED = "SUBMIT_FAILED"
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self not in (JobState.CREATED, JobState.PENDING, JobState.RUNNING, JobState.REQUEUED, JobState.UNKNOWN)


@dataclass
class JobStatus:
    state: JobState
    reason: str | None = None  # why PENDING / FAILED, as the scheduler says it
    exit_code: int | None = None
    nodes: list[str] = field(default_factory=list)
    elapsed_s: float | None = None
    source: str = ""  # which tool answered: squeue, sacct, jobcomp, local, stored
    restarts: int = 0  # requeues so far
    signal: int | None = None  # the signal that ended it, when one did
    node_count: int | None = None
    start_time: float | None = None
    end_time: float | None = None
    raw_state: str = ""  # the scheduler's own word, e.g. "CANCELLED by 0"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data


class SubmitError(RuntimeError):
    """The scheduler refused the job; the message is its own stderr."""


class Backend(Protocol):
    name: str

    def submit(self, run: Run) -> str:
        """Submit the run's rendered script; return the job id. Raises SubmitError."""
        ...

    def status(self, run: Run) -> JobStatus: ...

    def cancel(self, run: Run) -> None: ...
