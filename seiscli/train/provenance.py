"""What the trainer records about itself in the run directory (layouts in seiscli/run_layout.py): per attempt,
the environment as the job sees it (rank 0, after the process group is up), its line in the attempt ledger,
and, from every rank that exits non-zero, that exit code, so the job script's retry policy sees the cause
rather than srun's status for the ranks it ended afterwards. Also the test hook SEIS_FAULT (see `Fault`)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seiscli.run_layout import (
    EXIT_COMM,
    EXIT_FAILED,
    EXIT_LOADER,
    append_event,
    attempt_provenance_path,
    current_attempt,
    rank_exit_event,
)

# Exceptions of torch.distributed whose cause is the network or a peer, not this process's code.
_COMM_TYPES = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
_COMM_TEXT = ("NCCL", "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Watchdog caught")
_LOADER_TEXT = ("DataLoader worker", "exited unexpectedly", "killed by signal")
_LOADER_FRAMES = os.path.join("torch", "utils", "data", "")


def classify_exit(exc: BaseException) -> int:
    """The exit code for an exception the trainer did not handle: EXIT_COMM, EXIT_LOADER or EXIT_FAILED."""
    names = {c.__name__ for c in type(exc).__mro__}
    text = str(exc)
    # A worker that died (SIGKILL) surfaces in the trainer process inside torch.utils.data: "worker exited
    # unexpectedly", or, seen here, a ConnectionResetError while fetching a batch's shared memory from it. An
    # exception the worker raised itself (bad data, a bug) comes back as "Caught X in DataLoader worker".
    in_loader = any(_LOADER_FRAMES in f.filename for f in traceback.extract_tb(exc.__traceback__))
    died = in_loader or (_LOADER_TEXT[0] in text and any(s in text for s in _LOADER_TEXT[1:]))
    if died and "in DataLoader worker process" not in text:
        return EXIT_LOADER
    if names & set(_COMM_TYPES) or any(s in text for s in _COMM_TEXT):
        return EXIT_COMM
    return EXIT_FAILED


def node_name() -> str:
    """The node as Slurm names it (SLURMD_NODENAME, set in every task), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _rank() -> int:
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def record_rank_exit(run_dir: Path, code: int) -> None:
    """Every rank that exits non-zero appends one rank_exit line; never raises (the process is ending)."""
    try:
        event = rank_exit_event(current_attempt(), _rank(), code, node_name(), time.time())
        append_event(run_dir, event)
    except OSError:
        pass


def _command(args: list[str]) -> str | None:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def _git_commit(path: Path) -> str | None:
    return _command(["git", "-C", str(path), "rev-parse", "HEAD"]) if (path / ".git").exists() else None


def environment(nodes: list[str]) -> dict[str, Any]:
    """Versions of what this process runs on: Python and every installed distribution, torch, CUDA, cuDNN,
    NCCL, the GPU driver and devices, the container (where Pyxis/enroot say), and the nodes."""
    import torch

    import seiscli

    cuda = torch.cuda.is_available()
    packages = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}
    root = Path(seiscli.__file__).resolve().parent.parent
    info: dict[str, Any] = {
        "time": time.time(),
        "host": socket.gethostname(),
        "node": node_name(),
        "nodes": nodes,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "seiscli_path": str(root),
        "git_commit": _git_commit(root),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "driver": None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "container": {k: v for k, v in os.environ.items() if k.startswith(("PYXIS_", "ENROOT_", "SEIS_IMAGE"))},
        "slurm": {
            k: os.environ.get(k)
            for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_RESTART_COUNT", "SLURM_NTASKS", "SLURM_CLUSTER_NAME")
        },
        "packages": dict(sorted(packages.items(), key=lambda kv: kv[0].lower())),
    }
    if cuda:
        info["driver"] = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if info["driver"]:
            info["driver"] = info["driver"].splitlines()[0]
    return info


def gather_hosts(distributed: bool) -> list[str]:
    """Every rank's host name in rank order (one all_gather_object at start)."""
    me = node_name()
    if not distributed:
        return [me]
    import torch.distributed as dist

    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, me)
    return [str(h) for h in hosts]


def record_start(
    run_dir: Path,
    *,
    is_main: bool,
    distributed: bool,
    world_size: int,
    first_step: int,
    resumed_from: Path | None,
    recipe_changes: list[str] | None = None,
) -> None:
    """Collective (every rank calls it): rank 0 writes provenance/attempt-<k>.json and the ledger's trainer line."""
    ranks = gather_hosts(distributed)
    if not is_main:
        return
    nodes = list(dict.fromkeys(ranks))
    attempt = current_attempt()
    path = attempt_provenance_path(run_dir, attempt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        info = environment(nodes) | {"attempt": attempt, "rank_hosts": ranks}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(path)
    except Exception as e:  # a record of the run must never stop the run
        print(f"seis: warning: could not write {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    append_event(
        run_dir,
        {
            "event": "trainer",
            "attempt": attempt,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "time": time.time(),
            "first_step": first_step + 1,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "recipe_changes": recipe_changes or [],
            "world_size": world_size,
            "nodes": nodes,
        },
    )


@dataclass(frozen=True)
class Fault:
    """Test hook: SEIS_FAULT=KIND@STEP[/ATTEMPT] makes the trainer fail the way real jobs do, after step STEP
    of attempt ATTEMPT (default 1), so the job script's retry policy can be tested with real Slurm jobs.
    KIND: `comm` (the last rank raises torch.distributed.DistNetworkError), `kill` (the last rank SIGKILLs
    itself), `loader` (rank 0 SIGKILLs its data-loader workers, as the OOM killer does). Never set in production."""

    kind: str
    step: int
    attempt: int = 1

    @staticmethod
    def from_env() -> Fault | None:
        spec = os.environ.get("SEIS_FAULT")
        if not spec:
            return None
        kind, _, rest = spec.partition("@")
        step, _, attempt = rest.partition("/")
        return Fault(kind, int(step or 1), int(attempt or 1))

    def maybe(self, step: int, rank: int, world_size: int, loader: Any) -> None:
        if step != self.step or current_attempt() != self.attempt:
            return
        last = rank == world_size - 1
        if self.kind == "comm" and last:
            import torch.distributed as dist

            raise dist.DistNetworkError(f"SEIS_FAULT: injected communication failure after step {step}")
        if self.kind == "kill" and last:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "loader" and rank == 0:
            workers = getattr(getattr(loader, "_workers_iter", None), "_workers", None) or []
            for w in workers:
                os.kill(w.pid, signal.SIGKILL)
