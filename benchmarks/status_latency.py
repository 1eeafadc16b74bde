"""How long the light commands take (`seis --help`, `render`, `runs`), and `seis status` with many recorded
runs against whatever Slurm this machine has.

    python benchmarks/status_latency.py [--runs 50] [--repeat 7]

Each row is the median wall time of a fresh `seis status --json` process (what a user waits for), next to
the interpreter's own start and `seis --help` (the CLI's import cost), so the share spent on the runs and
the scheduler queries is visible. "unfinished" runs all need the scheduler (one squeue call, one sacct call,
one read of the jobcomp log); "finished" runs are answered from their submission.json alone. Every run also
has an attempt ledger (3 attempts) and provenance (launch.json, attempt-1.json with ~150 packages), as real
runs do, and `seis show RUN` / `seis status RUN` / `seis top RUN --once` / `seis logs RUN --errors` are timed on
one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from seiscli.launcher.provenance import write_launch_provenance
from seiscli.launcher.runs import create_run
from seiscli.recipe import load_recipe
from seiscli.run_layout import append_event, attempt_provenance_path


def wall(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_runs(root: Path, n: int, state: str) -> None:
    recipe = load_recipe("smoke", {"name": f"bench-{state.lower()}", "cluster.backend": "slurm"})
    for i in range(n):
        run = create_run(recipe, root)
        run.update_submission(backend="slurm", job_id=str(990000 + i), state=state, submitted=time.time())
        run.metrics_path.write_text("".join(json.dumps({"step": s, "samples_per_s": 10.0}) + "\n" for s in range(200)))
        write_launch_provenance(run.path, recipe)
        env = {
            "python": "3.11",
            "torch": "2.13",
            "nodes": ["node1"],
            "packages": {f"pkg{k}": "1.0" for k in range(150)},
        }
        attempt_provenance_path(run.path, 1).write_text(json.dumps(env))
        for k in (1, 2, 3):
            append_event(run.path, {"event": "start", "attempt": k, "job_id": str(990000 + i), "time": 1.0 * k})
            append_event(run.path, {"event": "end", "attempt": k, "exit_code": 3, "action": "requeue", "time": 2.0 * k})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    table = Table("command", "runs", "median wall (s)")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SEIS_RUNS_DIR": str(Path(tmp) / "empty")}
        table.add_row("python -c pass", "-", f"{wall([py, '-c', 'pass'], env, args.repeat):.3f}")
        for cmd in (["--help"], ["render", "pretrain"], ["runs"]):
            secs = wall([py, "-m", "seiscli", *cmd], env, args.repeat)
            table.add_row("seis " + " ".join(cmd), "-", f"{secs:.3f}")
        secs = wall([py, "-m", "seiscli", "status", "--json"], env, args.repeat)
        table.add_row("seis status --json", "0", f"{secs:.3f}")
        for state, label in (("RUNNING", "unfinished"), ("COMPLETED", "finished")):
            root = Path(tmp) / label
            make_runs(root, args.runs, state)
            env = {**os.environ, "SEIS_RUNS_DIR": str(root)}
            secs = wall([py, "-m", "seiscli", "status", "--json"], env, args.repeat)
            table.add_row("seis status --json", f"{args.runs} {label}", f"{secs:.3f}")
            secs = wall([py, "-m", "seiscli", "status"], env, args.repeat)
            table.add_row("seis status (table)", f"{args.runs} {label}", f"{secs:.3f}")
            one = f"bench-{'running' if label == 'unfinished' else 'completed'}"
            for cmd in (["show", one], ["status", one], ["top", one, "--once"], ["logs", one, "--errors"]):
                secs = wall([py, "-m", "seiscli", *cmd], env, args.repeat)
                table.add_row(f"seis {cmd[0]} RUN {' '.join(cmd[2:])}", f"1 of {args.runs} {label}", f"{secs:.3f}")
    console = Console()
    when = time.strftime("%Y-%m-%d %H:%M")
    console.print(f"{platform.node()}, {os.cpu_count()} CPUs, {when}, median of {args.repeat} processes")
    console.print(table)


if __name__ == "__main__":
    main()
