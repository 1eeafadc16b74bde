"""One line that stamps a failure with its time, rank, node and attempt (no torch import here).

Printed by the entry point after a traceback, so that `seis logs RUN --errors` can order the failures of many
ranks and attempts by when they happened (log lines carry no time of their own). Format, one line on stderr:
  seis: rank 3 on node7 failed at 2026-12-02T14:46:09.123456+00:00 (attempt 1)
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import datetime, timezone


def _attempt() -> int:
    """The attempt as the ledger numbers it (SEIS_ATTEMPT from the job script, from 1); else Slurm's requeue or
    torchrun's restart count + 1."""
    for var, plus in (("SEIS_ATTEMPT", 0), ("SLURM_RESTART_COUNT", 1), ("TORCHELASTIC_RESTART_COUNT", 1)):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value) + plus
    return 1


def _note(what: str) -> None:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    when = datetime.now(timezone.utc).isoformat()
    print(f"seis: rank {rank} on {node} {what} at {when} (attempt {_attempt()})", file=sys.stderr, flush=True)


def note_failure() -> None:
    _note("failed")


def note_start() -> None:
    """The matching line when a rank starts: opens its attempt in a log that several attempts append to."""
    _note("started")
