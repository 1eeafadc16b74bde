"""Run a function in several real gloo processes (torch.multiprocessing), as the distributed tests need.

Each worker gets (rank, world_size, *args); whatever rank 0 returns comes back to the test, and an
exception in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store: str, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result if rank == 0 else None))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        os._exit(1)
    # As the trainer's own entry point does: gloo's and DDP's C++ destructors can abort or hang at interpreter
    # exit once peers are gone, so every rank waits for the others, then leaves without running them.
    dist.barrier()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300) -> Any:
    """Run fn(rank, world_size, *args) in `world_size` processes; return rank 0's result."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = mp.start_processes(
            _worker,
            args=(world_size, os.path.join(tmp, "store"), fn, args, queue),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        crashed = ""
        try:
            procs.join(timeout)
        except mp.ProcessExitedException as e:
            # A rank failed (it reported, then exited 1) or crashed; join has killed the others.
            crashed = f"\n{e}"
        results = [queue.get() for _ in range(world_size) if not queue.empty()]
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    errors = [f"rank {r}:\n{payload}" for r, status, payload in results if status == "error"]
    if errors or crashed:
        raise AssertionError("\n".join(errors) + crashed)
    if len(results) != world_size:
        raise AssertionError(f"only {len(results)} of {world_size} ranks reported (timeout {timeout}s or crash)")
    return next(payload for r, _, payload in results if r == 0)
