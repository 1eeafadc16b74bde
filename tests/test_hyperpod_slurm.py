"""The hyperpod-slurm job script, run for real on the local Slurm cluster: two nodes, the smoke recipe, the
EFA environment and the per-task rendezvous wrapper; auto-resume is left out (this is not a HyperPod node)
and the script says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm(nodes=2), pytest.mark.slow]


def seis(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_smoke_trains_through_the_hyperpod_script(tmp_path: Path) -> None:
    profile = tmp_path / "local-hyperpod.yaml"
    profile.write_text(
        yaml.safe_dump(
            {
                "type": "hyperpod-slurm",
                "partition": "debug",
                "nodes": 2,
                "gpus_per_node": 0,
                "shared_dir": str(tmp_path),
                "local_dir": str(tmp_path / "nvme"),
                "env": {"SEIS_PROBE": "from-profile"},
            }
        )
    )
    env = {"SEIS_RUNS_DIR": str(tmp_path / "runs"), "SEIS_CLUSTER": str(profile)}
    out = seis("launch", "smoke", "--nodes", "2", "--steps", "6", "--set", "cluster.time_limit=00:20:00", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "runs").glob("smoke/*")
    script = (run_dir / "job.sbatch").read_text()
    assert "rendezvous_on_rank0" in script and "FI_PROVIDER=efa" in script
    deadline = time.monotonic() + 240
    while True:
        row = json.loads(seis("status", "--json", str(run_dir), env=env).stdout)[0]
        if row["state"] not in ("PENDING", "RUNNING", "REQUEUED", "UNKNOWN"):
            break
        assert time.monotonic() < deadline, row
        time.sleep(2)
    job_log = (run_dir / "logs" / f"slurm-{row['job_id']}.out").read_text()
    assert row["state"] == "COMPLETED", job_log + (run_dir / "logs" / "rank-0.log").read_text()[-3000:]
    assert "not a HyperPod node (no /opt/sagemaker_cluster): running without --auto-resume" in job_log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == 6
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-1] == 6
