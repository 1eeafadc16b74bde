"""The embedded default: run the rendered launch script on this machine, in the foreground.

The launcher never imports torch: it starts `bash launch.sh` (torchrun inside) in its own process
group, streams its output to `logs/job.out`, and follows `metrics.jsonl` for the progress display.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seiscli.launcher.backends.base import JobState, JobStatus
from seiscli.launcher.runs import Run
from seiscli.recipe import Recipe, validate


def local_gpu_count() -> int:
    """GPUs on this machine, asked of nvidia-smi (importing torch would cost seconds)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def fit_to_machine(recipe: Recipe, gpus: int | None = None) -> tuple[Recipe, list[str]]:
    """The same recipe sized for this machine: one node, its GPUs (or CPU processes)."""
    gpus = local_gpu_count() if gpus is None else gpus
    data = recipe.model_dump(mode="json")
    c = data["cluster"]
    changes: list[str] = []
    want = {"backend": "local", "nodes": 1, "gpus_per_node": min(c["gpus_per_node"], gpus)}
    for key, value in want.items():
        if c[key] != value:
            changes.append(f"cluster.{key} {c[key]} -> {value}")
            c[key] = value
    return validate(data), changes


class LocalBackend:
    name = "local"

    def submit(self, run: Run) -> str:
        """Start the run in the background; the job id is the process id."""
        out = (run.logs_dir / "job.out").open("ab")
        proc = subprocess.Popen(
            ["bash", str(run.path / "launch.sh")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: Ctrl-C and cancel reach every rank
        )
        out.close()
        self._proc = proc
        run.update_submission(backend=self.name, job_id=str(proc.pid), submitted=time.time(), state="RUNNING")
        return str(proc.pid)

    def wait(self, run: Run, on_tick: Callable[[], Any] | None = None, poll_s: float = 0.5) -> int:
        """Wait for the run started by submit(); Ctrl-C stops every rank cleanly (SIGTERM, then SIGKILL)."""
        proc = self._proc
        try:
            while proc.poll() is None:
                if on_tick:
                    on_tick()
                time.sleep(poll_s)
        except KeyboardInterrupt:
            _stop_group(proc.pid, proc)
            run.update_submission(state=JobState.CANCELLED.value, exit_code=proc.returncode, finished=time.time())
            raise
        finally:
            if on_tick:
                on_tick()
        state = JobState.COMPLETED if proc.returncode == 0 else JobState.FAILED
        run.update_submission(state=state.value, exit_code=proc.returncode, finished=time.time())
        return proc.returncode

    def status(self, run: Run) -> JobStatus:
        sub = run.submission()
        state = JobState(sub.get("state", "UNKNOWN"))
        pid = int(sub.get("job_id") or 0)
        if state == JobState.RUNNING and not _alive(pid):
            state = JobState.FAILED if not run.summary() else JobState.COMPLETED  # launcher died meanwhile
        end = sub.get("finished") or time.time()
        elapsed = end - sub["submitted"] if "submitted" in sub else None
        return JobStatus(state=state, exit_code=sub.get("exit_code"), elapsed_s=elapsed, source="local")

    def cancel(self, run: Run) -> None:
        pid = int(run.submission().get("job_id") or 0)
        if pid and _alive(pid):
            _stop_group(pid, None)
        run.update_submission(state=JobState.CANCELLED.value, finished=time.time())


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); it is not running.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def _stop_group(pid: int, proc: subprocess.Popen[bytes] | None, grace_s: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not _alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
