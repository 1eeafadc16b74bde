"""Per-step metrics (rank 0 appends one JSON line per step to metrics.jsonl) and the end-of-run summary.

The launcher tails metrics.jsonl live, so every line is flushed as soon as it is written. Key names of a
step line: step, loss, lr, grad_norm, step_time_s, data_wait_s, samples_per_s, tokens_per_s, world_size,
time (unix seconds), plus tflops_per_gpu, mfu (only where the GPU's peak is known) and max_mem_gb (CUDA).
samples_per_s and tokens_per_s are global; a sample's tokens are all N tokens of its crop.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class MetricsLog:
    """Collects step records on every rank (for the summary) and writes them on rank 0."""

    def __init__(self, run_dir: Path, *, write: bool) -> None:
        self.records: list[dict[str, Any]] = []
        self._file: TextIO | None = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if write else None  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def excluded_warmup_steps(n: int) -> int:
    """Steps left out of the throughput means: the first 10 % (at least 1, at most 10) when there are 2+."""
    return 0 if n < 2 else min(10, max(1, n // 10))


def summarise(records: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Run summary: throughput over all steps but the first few (compilation, allocator and loader warm-up)."""
    skip = excluded_warmup_steps(len(records))
    window = records[skip:]
    seconds = sum(r["step_time_s"] for r in window)
    summary: dict[str, Any] = {
        "steps": len(records),
        "final_loss": records[-1]["loss"] if records else None,
        "throughput_excludes_first_steps": skip,
        "samples_per_s": sum(r["samples_per_s"] * r["step_time_s"] for r in window) / seconds if seconds else None,
        "tokens_per_s": sum(r["tokens_per_s"] * r["step_time_s"] for r in window) / seconds if seconds else None,
        "data_wait_fraction": sum(r["data_wait_s"] for r in window) / seconds if seconds else None,
    }
    for key in ("tflops_per_gpu", "mfu"):
        if window and key in window[0]:
            summary[key] = sum(r[key] * r["step_time_s"] for r in window) / seconds
    summary.update(extra)
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Written atomically, so a reader never sees half a file."""
    tmp = run_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / SUMMARY_FILE)
