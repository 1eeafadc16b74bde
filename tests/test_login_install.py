"""The light login-node install: `pip install .` without extras, in a virtual environment of its own.

It must render, submit, and follow a job (status, logs, runs, doctor) with no torch, zarr or deepspeed
installed, and find the shipped recipes and templates without the repository (they travel in the wheel).
The job itself runs under the full training environment (this test's interpreter, via cluster.python),
as it would on a compute node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "zarr", "deepspeed", "numpy")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def login_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("login")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    pip = [str(root / "venv/bin/python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    out = subprocess.run(
        [*pip, "-c", str(REPO / "locks/dev.txt"), str(REPO)], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def run(login_env: Path, *args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["SEIS_RUNS_DIR"] = str(cwd / "runs")
    env["COLUMNS"] = "200"  # rich tables at full width
    return subprocess.run(
        [str(login_env / "venv/bin/seis"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_base_install_has_no_heavy_packages(login_env: Path) -> None:
    code = f"import importlib.util; print([m for m in {HEAVY!r} if importlib.util.find_spec(m)])"
    out = subprocess.run([str(login_env / "venv/bin/python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    check = subprocess.run([str(login_env / "venv/bin/python"), "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


@pytest.mark.slurm
def test_login_install_renders_submits_and_follows_a_job(login_env: Path, tmp_path: Path) -> None:
    assert run(login_env, "--help", cwd=tmp_path).returncode == 0
    script = run(login_env, "render", "smoke", "--set", "cluster.backend=slurm", cwd=tmp_path)
    assert script.returncode == 0 and "#SBATCH" in script.stdout, script.stderr
    doctor = run(login_env, "doctor", "smoke", "--set", "cluster.backend=slurm", cwd=tmp_path)
    assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stdout + doctor.stderr

    launched = run(
        login_env,
        "launch", "smoke", "--backend", "slurm", "--steps", "4", "--set", f"cluster.python={sys.executable}",
        cwd=tmp_path,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout + launched.stderr
    deadline = time.monotonic() + 300
    while True:
        status = run(login_env, "status", "--json", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        (row,) = json.loads(status.stdout)
        if row["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        assert time.monotonic() < deadline, row
        time.sleep(2)
    assert row["state"] == "COMPLETED" and row["last_step"] == 4, row
    logs = run(login_env, "logs", row["run"], cwd=tmp_path)
    assert logs.returncode == 0 and "step" in logs.stdout, logs.stderr
    assert row["run"] in run(login_env, "runs", cwd=tmp_path).stdout
