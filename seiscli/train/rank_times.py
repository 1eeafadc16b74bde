"""Per-rank step times for `seis top` (stragglers): rank 0 writes what the step's all-gather already brought it.

ranks.json (once per attempt): the node of every rank. rank_times.jsonl (one line every logging.interval steps):
{"step", "time", "step_time_s": [seconds of each rank up to the step's collective]}. No extra collective per
step: the times come from the gather the trainer does anyway; the node names take one all_gather_object at start.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TextIO

import torch.distributed as dist

from seiscli.train.distributed import DistEnv

RANKS_FILE = "ranks.json"
RANK_TIMES_FILE = "rank_times.jsonl"


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or os.environ.get("NODE_NAME") or socket.gethostname()


class RankTimes:
    def __init__(self, run_dir: Path, env: DistEnv, interval: int) -> None:
        self.interval = max(1, interval)
        nodes: list[str | None] = [None] * env.world_size
        if env.distributed:
            dist.all_gather_object(nodes, node_name())
        else:
            nodes = [node_name()]
        self._file: TextIO | None = None
        if env.is_main:
            tmp = run_dir / f".{RANKS_FILE}.tmp"
            tmp.write_text(json.dumps({"nodes": nodes, "time": time.time()}) + "\n")
            os.replace(tmp, run_dir / RANKS_FILE)
            self._file = open(run_dir / RANK_TIMES_FILE, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, times: list[float]) -> None:
        if self._file is None or step % self.interval:
            return
        line = {"step": step, "time": time.time(), "step_time_s": [round(t, 5) for t in times]}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
