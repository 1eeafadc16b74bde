"""`seis doctor --nccl` on the real local Slurm cluster (gloo on CPU), and `seis launch --exclude-from`.

The two nodes are healthy, so each case makes one of them bad through the benchmark's fault knobs (honoured by
the job on the named node only): SEIS_NCCL_CHECK_SLOW holds each timed all-reduce there back (a slow link), and
SEIS_NCCL_CHECK_BREAK points gloo at a network interface that does not exist (a dead NIC: gloo's init fails for
real). The thresholds are this test profile's: they check the mechanics, not the machine's speed.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from seiscli.launcher.backends.base import JobState
from seiscli.launcher.backends.slurm import run_slurm
from seiscli.launcher.jobs import current_statuses
from seiscli.launcher.nccl_check import round_robin
from seiscli.launcher.runs import Run

PROFILE = {
    "type": "slurm",
    "partition": "debug",
    "nodes": 2,
    "gpus_per_node": 0,
    # Healthy gloo on this machine: ~0.2-0.4 GB/s at 4 MiB; a node held back 0.5 s per all-reduce: ~0.008.
    "nccl_check": {
        "intra_node_busbw_gbps": 0.2,
        "inter_node_busbw_gbps": 0.2,
        "slow_fraction": 0.1,
        "message_mb": 4,
        "iters": 4,
        "timeout_s": 20,
        "time_limit": "00:05:00",
    },
}


def seis(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        cwd=tmp,
        env={**os.environ, "SEIS_RUNS_DIR": str(tmp / "runs"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(PROFILE))
    return path


def nccl_check(tmp: Path, profile: Path, knob: dict[str, str]) -> tuple[int, dict]:
    out = seis(tmp, "doctor", "--nccl", "--cluster", str(profile), "--nodelist", "node[1-2]", "--json", env=knob)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return out.returncode, json.loads(out.stdout)


@pytest.mark.slow
@pytest.mark.slurm(nodes=2)
def test_a_slow_node_and_a_broken_node_are_excluded_and_launch_keeps_off_them(tmp_path: Path, profile: Path) -> None:
    code, slow = nccl_check(tmp_path, profile, {"SEIS_NCCL_CHECK_SLOW": "node2:0.5"})
    assert slow["job_state"] == "COMPLETED"
    v = {x["node"]: x for x in slow["verdicts"]}
    assert code == 1 and slow["excluded"] == ["node2"], slow
    assert v["node1"]["status"] == "healthy" and v["node2"]["status"] == "slow" and v["node2"]["action"]
    assert v["node2"]["intra_busbw_gbps"] < 0.02 < v["node1"]["intra_busbw_gbps"]
    assert slow["pairs"][0]["busbw_gbps"] < 0.02  # the pair waits for its slow end
    lines = Path(slow["exclude_file"]).read_text().splitlines()
    assert lines[0].startswith("#") and [x.split()[0] for x in lines[1:]] == ["node2"]

    code, broken = nccl_check(tmp_path, profile, {"SEIS_NCCL_CHECK_BREAK": "node1"})
    v = {x["node"]: x for x in broken["verdicts"]}
    assert code == 1 and broken["excluded"] == ["node1"], broken
    assert v["node1"]["status"] == "failed" and "seis-broken0" in v["node1"]["reason"]  # gloo's own words
    assert v["node2"]["status"] == "healthy" and broken["pairs"][0]["busbw_gbps"] is None
    exclude = broken["exclude_file"]

    dry = seis(tmp_path, "launch", "smoke", "--cluster", str(profile), "--exclude-from", exclude, "--dry-run")
    assert dry.returncode == 0 and "#SBATCH --exclude=node1\n" in dry.stdout, dry.stderr
    # A real job: Slurm keeps it off node1 even when node1 is idle.
    out = seis(tmp_path, "launch", "smoke", "--cluster", str(profile), "--exclude-from", exclude, "--steps", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = [Run(p.parent) for p in (tmp_path / "runs").glob("smoke/*/submission.json")]
    assert "--exclude=node1" in run.recipe_path.read_text()  # recorded with the run
    job = str(run.submission()["job_id"])
    try:
        deadline = time.monotonic() + 600
        while True:
            _, st = current_statuses([run])[run.path]
            if st.state in (JobState.RUNNING, *[s for s in JobState if s.finished]) and st.nodes:
                break
            assert time.monotonic() < deadline, f"job {job} never started: {st}"
            time.sleep(1)
        assert st.nodes == ["node2"]
    finally:
        run_slurm(["scancel", job])


def test_bad_exclude_file_and_missing_baselines_are_exit_2_and_submit_nothing(tmp_path: Path, profile: Path) -> None:
    bad = tmp_path / "exclude.txt"
    bad.write_text("# from a check\nnode1\nnode 2; rm -rf /\n")
    out = seis(tmp_path, "launch", "smoke", "--cluster", str(profile), "--exclude-from", str(bad))
    assert out.returncode == 2 and f"{bad}:3" in out.stderr and "not a node name" in out.stderr
    missing = seis(tmp_path, "launch", "smoke", "--cluster", str(profile), "--exclude-from", str(tmp_path / "no"))
    assert missing.returncode == 2 and "--exclude-from" in missing.stderr
    local = seis(tmp_path, "launch", "smoke", "--backend", "local", "--exclude-from", str(bad))
    assert local.returncode == 2 and "only for Slurm" in local.stderr
    no_base = tmp_path / "nobase.yaml"
    no_base.write_text(yaml.safe_dump({k: v for k, v in PROFILE.items() if k != "nccl_check"}))
    doc = seis(tmp_path, "doctor", "--nccl", "--cluster", str(no_base), "--nodelist", "node1")
    assert doc.returncode == 2 and "nccl_check.intra_node_busbw_gbps" in doc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("n", range(1, 8))
def test_round_robin_meets_every_pair_once_in_disjoint_rounds(n: int) -> None:
    nodes = [f"n{i}" for i in range(n)]
    rounds = round_robin(nodes)
    met = [tuple(sorted(p)) for r in rounds for p in r]
    assert sorted(met) == sorted(itertools.combinations(nodes, 2))
    assert all(len({x for p in r for x in p}) == 2 * len(r) for r in rounds)  # no node twice in a round
    assert len(rounds) == (n - 1 if n % 2 == 0 else n) if n > 1 else rounds == []
