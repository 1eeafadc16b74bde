"""Requeue on preemption or time limit: the trainer's half of `#SBATCH --signal=USR1@<s>` and `--requeue`.

Slurm sends USR1 to every rank `signal_seconds` before the time limit (or a preemption). The trainer must not
checkpoint inside the signal handler; it notes the signal, finishes its step, checkpoints collectively, and
then calls `requeue()`: rank 0 asks Slurm to put the job back in the queue; Slurm then ends this attempt
(SIGTERM, then SIGKILL after KillWait) and starts the job again later with SLURM_RESTART_COUNT + 1, when the
trainer resumes from the checkpoint.

    flag = UsrSignal()            # once, at start-up
    ...
    if flag.received:             # at a step boundary, the same on every rank (all-reduce it first)
        save_checkpoint(...)
        if requeue():             # rank 0 only; True when Slurm accepted
            sys.exit(0)

No torch here: the launcher and plain job scripts import it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from types import FrameType


class UsrSignal:
    """Remembers that a signal (USR1 by default) arrived; the handler does nothing else."""

    def __init__(self, signum: int = signal.SIGUSR1) -> None:
        self.signum = signum
        self.received = False
        signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True


def slurm_rank() -> int:
    """This process's global rank under srun (SLURM_PROCID), else torchrun's RANK, else 0."""
    return int(os.environ.get("SLURM_PROCID") or os.environ.get("RANK") or 0)


def requeue(rank: int | None = None, *, timeout_s: float = 60.0) -> bool:
    """From rank 0 of a Slurm job: `scontrol requeue $SLURM_JOB_ID`. Returns whether the job was requeued.

    Other ranks, and processes outside a Slurm job, get False without doing anything. Call it after the
    checkpoint is complete on every rank: the requeue ends all of the job's processes.
    """
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id or (slurm_rank() if rank is None else rank) != 0:
        return False
    exe = shutil.which("scontrol")
    if exe is None:
        print("seis: cannot requeue: scontrol not found on PATH", file=sys.stderr, flush=True)
        return False
    try:
        p = subprocess.run([exe, "requeue", job_id], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"seis: scontrol requeue {job_id} did not answer in {timeout_s:.0f} s", file=sys.stderr, flush=True)
        return False
    if p.returncode != 0:
        # e.g. "Requested operation is presently disabled" when the job was submitted with --no-requeue
        print(f"seis: scontrol requeue {job_id} failed: {p.stderr.strip()}", file=sys.stderr, flush=True)
        return False
    print(f"seis: job {job_id} requeued (restart {restart_count() + 1} to come)", file=sys.stderr, flush=True)
    return True


def restart_count() -> int:
    """How many times this job was requeued before this attempt (0 on the first)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
