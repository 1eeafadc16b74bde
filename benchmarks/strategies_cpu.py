"""Step time of each parallel strategy for a tiny MAE on 2 gloo CPU processes, through the real entry point.

Each strategy runs `torchrun --standalone --nproc-per-node 2 -m seiscli.train` on the smoke recipe (fp32,
one thread per process) with only `parallelism.strategy` changed, and reads the run's metrics.jsonl and
summary.json. On CPU this measures framework overhead (DeepSpeed's bucketing and partitioning, FSDP2's
gathers) on a model too small for communication to overlap anything: not a GPU prediction.

    python benchmarks/strategies_cpu.py                        # every implemented strategy, 40 steps
    python benchmarks/strategies_cpu.py --strategies ddp zero2 --steps 20 --out strategies_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from seiscli.recipe import load_recipe
from seiscli.train.parallel import ENGINES


def run_strategy(strategy: str, steps: int, work: Path) -> dict[str, Any]:
    recipe = load_recipe("smoke", {"parallelism.strategy": strategy, "train.steps": steps, "checkpoint.interval": 0})
    path = work / f"{strategy}.yaml"
    path.write_text(recipe.to_yaml())
    run_dir = work / strategy
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "seiscli.train", str(path), "--run-dir", str(run_dir)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("SEIS_DATA_DIR", str(work / "data"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"strategy": strategy, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [r["step_time_s"] for r in records[summary["throughput_excludes_first_steps"] :]]
    return {
        "strategy": strategy,
        "median_step_s": statistics.median(times),
        "p90_step_s": statistics.quantiles(times, n=10)[-1] if len(times) >= 10 else max(times),
        "samples_per_s": summary["samples_per_s"],
        "final_loss": summary["final_loss"],
        "process_wall_s": wall,  # includes interpreter start, imports (DeepSpeed's are slow) and the data cache
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [s for s in ("ddp", "fsdp2", "zero1", "zero2", "zero3") if s in ENGINES]
    parser.add_argument("--strategies", nargs="+", default=default)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_strategy(s, args.steps, Path(tmp)) for s in args.strategies]
    print("| strategy | median step (ms) | p90 step (ms) | samples/s | final loss | process wall (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['strategy']} | failed: {r['error']} | | | | |")
            continue
        print(f"| {r['strategy']} | {r['median_step_s'] * 1e3:.1f} | {r['p90_step_s'] * 1e3:.1f} | "
              f"{r['samples_per_s']:.1f} | {r['final_loss']:.4f} | {r['process_wall_s']:.1f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
