"""Where a step's time goes (for `seis scale-sweep`): per-phase clocks and a short collective benchmark.

A step is timed as contiguous phases, so that they add up to the rank's own step time:
  data       blocked in next(loader)
  compute    micro-batch preparation, forward and backward up to the moment the last gradient exists
  comm       the rest of forward_backward: the wait for gradient reductions not overlapped with backward
  optimizer  engine.step (clipping, the update; for ZeRO also its parameter all-gather)
Wall clocks on CPU; CUDA events on the current stream on GPU (the trainer synchronizes once per step, and
events are read only then). "The last gradient exists" is the last `post_accumulate_grad` hook of the
module's parameters, which marks the end of backward compute only where the engine reduces gradients after
autograd accumulated them (DDP, ZeRO-1/2: SPLIT_STRATEGIES). FSDP2 and ZeRO-3 gather parameters inside
forward and backward and hand the module its gradient only after reducing it, so for them the whole
forward_backward counts as compute and `comm_split` is False in the record.

Across ranks (from the trainer's per-step all-gather): the median rank's phases are the step's phases,
straggler = slowest rank's time - median rank's time, and the all-gather itself is step-end communication.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PHASES = ("data", "compute", "comm", "optimizer")
SPLIT_STRATEGIES = ("ddp", "zero1", "zero2")
COLLECTIVES_FILE = "collectives.json"


class StepClock:
    """Phase times of one rank's step; `mark()` returns an opaque time point, `span()` books one phase."""

    def __init__(self, device: torch.device, module: torch.nn.Module, *, split: bool = True) -> None:
        self.cuda = device.type == "cuda"
        self._spans: list[tuple[str, Any, Any]] = []
        self._last_grad: Any = None
        self._hooked = 0
        for p in module.parameters() if split else ():
            if p.requires_grad:
                try:
                    p.register_post_accumulate_grad_hook(self._on_grad)
                except RuntimeError:  # a parameter type that takes no hooks: its engine gets no comm split
                    continue
                self._hooked += 1
        self.comm_split = False  # set per step: whether a gradient hook fired

    def _on_grad(self, _: torch.Tensor) -> None:
        self._last_grad = self.mark()

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def begin(self) -> None:
        self._spans.clear()
        self.comm_split = False

    def span(self, phase: str, start: Any, end: Any) -> None:
        self._spans.append((phase, start, end))

    def before_backward(self) -> None:
        self._last_grad = None

    def forward_backward(self, start: Any, end: Any) -> None:
        """Book [start, end] as compute up to the last gradient hook and comm after it."""
        if self._last_grad is None:
            self.span("compute", start, end)
            return
        self.comm_split = True
        self.span("compute", start, self._last_grad)
        self.span("comm", self._last_grad, end)

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def totals(self) -> dict[str, float]:
        """Seconds per phase; on GPU call after the stream is synchronized."""
        out = dict.fromkeys(PHASES, 0.0)
        for phase, a, b in self._spans:
            out[phase] += max(0.0, self._seconds(a, b))
        return out


def split_step(rows: list[list[float]], step_time: float) -> dict[str, float]:
    """The step's attribution from every rank's [own step time, *PHASES] and rank 0's full step time.

    The median rank (by own time; the lower middle one for an even count) gives the phases; straggler is the
    slowest rank's own time over the median's; the step-end collective (step_time - slowest) is comm; `other`
    is the median rank's time no phase covers."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    med = rows[order[(len(rows) - 1) // 2]]
    slowest = rows[order[-1]][0]
    parts = dict(zip(PHASES, med[1:], strict=True))
    parts["straggler"] = slowest - med[0]
    parts["comm"] += step_time - slowest
    parts["other"] = med[0] - sum(med[1:])
    return parts


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def bench_collectives(device: torch.device, run_dir: Path | None, *, mib: int | None = None) -> dict[str, Any]:
    """All-reduce and all-gather bus bandwidth of this allocation (nccl-tests conventions: all-reduce
    busbw = bytes/t * 2(n-1)/n, all-gather busbw = total bytes/t * (n-1)/n, in GB/s); rank 0 writes collectives.json."""
    if not (dist.is_available() and dist.is_initialized()):
        result: dict[str, Any] = {"world_size": 1, "note": "one process: no collectives to measure"}
    else:
        n = dist.get_world_size()
        size = (mib or (256 if device.type == "cuda" else 8)) << 20
        x = torch.ones(size // 4, dtype=torch.float32, device=device)
        shard = torch.ones(size // 4 // n, dtype=torch.float32, device=device)
        parts = [torch.empty_like(shard) for _ in range(n)]

        def timed(fn: Any, reps: int = 5) -> float:
            for _ in range(2):  # warm-up: connections, buffers
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) / reps

        t_ar = timed(lambda: dist.all_reduce(x))
        t_ag = timed(lambda: dist.all_gather(parts, shard))
        gathered = shard.numel() * 4 * n
        result = {
            "world_size": n,
            "backend": dist.get_backend(),
            "all_reduce": {"bytes": size, "time_s": t_ar, "busbw_gb_s": size / t_ar * 2 * (n - 1) / n / 1e9},
            "all_gather": {"bytes": gathered, "time_s": t_ag, "busbw_gb_s": gathered / t_ag * (n - 1) / n / 1e9},
        }
    if run_dir is not None:
        (run_dir / COLLECTIVES_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
