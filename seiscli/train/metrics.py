"""Per-step metrics (rank 0 appends one JSON line per step to metrics.jsonl) and the end-of-run summary.

The launcher tails metrics.jsonl live, so every line is flushed as soon as it is written. Key names of a
step line: step, loss, lr, grad_norm, step_time_s, data_wait_s, samples_per_s, tokens_per_s, world_size,
time (unix seconds), plus tflops_per_gpu, mfu (only where the GPU's peak is known) and max_mem_gb (CUDA).
samples_per_s and tokens_per_s are global; a sample's tokens are all N tokens of its crop. Stragglers:
step_time_max_s is the slowest rank's time up to the step's collective, straggler_ratio that over the
median rank's; the summary keeps the worst ratio (straggler_ratio_max, at straggler_step).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Rates averaged over the run, weighted by step time (i.e. totals over total time).
_RATES = ("samples_per_s", "tokens_per_s", "tflops_per_gpu", "mfu")


def excluded_warmup_steps(n: int) -> int:
    """Steps left out of the throughput means: the first 10 % (at least 1, at most 10) of a run of 2+ steps."""
    return 0 if n < 2 else min(10, max(1, n // 10))


class MetricsLog:
    """Writes step records on rank 0 and keeps, on every rank, only what the summary needs: the last record
    and time-weighted sums over the steps after the first `skip` (compilation, allocator, loader warm-up)."""

    def __init__(self, run_dir: Path | None, *, skip: int) -> None:
        self.skip = skip
        self.steps = 0
        self.last: dict[str, Any] | None = None
        self._seconds = 0.0
        self._wait = 0.0
        self._sums: dict[str, float] = {}
        self._straggler: tuple[float, int] | None = None  # worst (ratio, step) after the skipped steps
        self._file: TextIO | None = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if run_dir else None  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        self.steps += 1
        self.last = record
        if self.steps > self.skip:
            dt = record["step_time_s"]
            self._seconds += dt
            self._wait += record["data_wait_s"]
            for key in _RATES:
                if key in record:
                    self._sums[key] = self._sums.get(key, 0.0) + record[key] * dt
            ratio = record.get("straggler_ratio")
            if ratio is not None and (self._straggler is None or ratio > self._straggler[0]):
                self._straggler = (ratio, record["step"])
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def summary(self, **extra: Any) -> dict[str, Any]:
        s = self._seconds
        summary: dict[str, Any] = {
            "steps": self.steps,
            "final_loss": self.last["loss"] if self.last else None,
            "throughput_excludes_first_steps": self.skip,
            **{key: (v / s if s else None) for key, v in self._sums.items()},
            "data_wait_fraction": self._wait / s if s else None,
            "straggler_ratio_max": self._straggler[0] if self._straggler else None,
            "straggler_step": self._straggler[1] if self._straggler else None,
        }
        summary.setdefault("samples_per_s", None)
        summary.update(extra)
        return summary

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def drop_steps_after(run_dir: Path, step: int) -> None:
    """Keep only the lines of steps <= `step` in metrics.jsonl (atomically): a run resumed from the checkpoint
    of `step` does the later steps again, and the file stays one line per step."""
    path = run_dir / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Written atomically, so a reader never sees half a file."""
    tmp = run_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / SUMMARY_FILE)
