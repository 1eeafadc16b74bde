"""Graceful stop on SIGTERM (Slurm preemption / time limit, torchrun shutdown), SIGINT (Ctrl-C) and SIGUSR1
(Slurm's `--signal=USR1@s` warning before the time limit or a preemption).

The handler only records the signal; the trainer stops at the end of the current step, once every rank
agrees (the signal's priority rides on the per-step collective), checkpoints, writes its final metrics and
exits 128 + signal number (143 for SIGTERM, 130 for SIGINT); after SIGUSR1 rank 0 first asks Slurm to
requeue the job. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# When ranks (or one rank, over a step) got different signals, the highest wins: USR1's requeue is still
# right when SIGTERM follows it (the time limit after the warning).
PRIORITY = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR1: 3}
BY_PRIORITY = {p: int(s) for s, p in PRIORITY.items()}


def priority(signum: int | None) -> int:
    return 0 if signum is None else PRIORITY.get(signal.Signals(signum), 0)


_early: list[int] = []


def _record_early(signum: int, frame: FrameType | None) -> None:
    _early.append(signum)


def catch_early_usr1() -> None:
    """From process start: SIGUSR1's default action kills the process, and Slurm's warning can come while the
    trainer is still starting (imports, model, resume). Remember it; the training loop acts on it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _record_early)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = _early.pop() if _early else None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if priority(signum) >= priority(self.signum):
            self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()
