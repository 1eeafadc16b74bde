"""The CLI as users run it: a subprocess, exit codes, what it writes, what it imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HEAVY = ("torch", "deepspeed", "zarr", "numpy", "mdio", "s3fs")


def seis(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SEIS_RUNS_DIR": str(cwd / "runs")}
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def imported_after(args: list[str], cwd: Path) -> tuple[list[str], float]:
    """Run the CLI in a fresh interpreter and report which heavy modules it imported, and its wall time."""
    code = (
        f"import sys, time; t = time.perf_counter(); sys.argv = ['seis', *{args!r}]\n"
        "from seiscli.launcher.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('\\nIMPORTED', [m for m in {HEAVY!r} if m in sys.modules], time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SEIS_RUNS_DIR": str(cwd / "runs")},
    )
    line = [x for x in out.stdout.splitlines() if x.startswith("IMPORTED")][-1]
    mods, secs = line.removeprefix("IMPORTED ").rsplit(" ", 1)
    return json.loads(mods.replace("'", '"')), float(secs)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["render", "pretrain"],
        ["runs"],
        ["status"],
        ["recipes", "list"],
        ["launch", "pretrain", "--dry-run"],
    ],
)
def test_light_commands_import_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    mods, _ = imported_after(args, tmp_path)
    assert mods == []


def test_run_commands_import_nothing_heavy(tmp_path: Path) -> None:
    """status / logs / show / rerun --dry-run of a run with provenance and a ledger: all the way through, no torch."""
    from seiscli.launcher.provenance import write_launch_provenance
    from seiscli.launcher.runs import create_run
    from seiscli.recipe import load_recipe
    from seiscli.run_layout import append_event

    recipe = load_recipe("smoke", {"name": "light", "cluster.backend": "slurm"})
    run = create_run(recipe, tmp_path / "runs")
    write_launch_provenance(run.path, recipe)
    (run.path / "job.sbatch").write_text("#!/bin/bash\necho hi\n")
    (run.logs_dir / "rank-0.log").write_text("step 1\n")
    run.update_submission(backend="slurm", script="job.sbatch", state="COMPLETED", job_id="1")
    append_event(run.path, {"event": "start", "attempt": 1, "job_id": "1", "nodes": ["node1"], "time": 1.0})
    append_event(run.path, {"event": "end", "attempt": 1, "job_id": "1", "exit_code": 0, "action": "done", "time": 2.0})
    for args in (["status", "light"], ["logs", "light"], ["show", "light"], ["rerun", "light", "--dry-run"]):
        mods, _ = imported_after(args, tmp_path)
        assert mods == [], args
    shown = seis("show", "light", cwd=tmp_path)
    assert shown.returncode == 0 and "node1" in shown.stdout and "done" in shown.stdout, shown.stderr


def test_dry_run_prints_sixteen_node_script_and_writes_nothing(tmp_path: Path) -> None:
    out = seis("launch", "pretrain", "--nodes", "16", "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=16" in out.stdout and "srun" in out.stdout
    subprocess.run(["bash", "-n"], input=out.stdout, text=True, check=True)
    assert not (tmp_path / "runs").exists()


def test_render_applies_overrides(tmp_path: Path) -> None:
    out = seis("render", "pretrain", "-N", "4", "--zero-stage", "3", "--set", "cluster.partition=gpu", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --nodes=4" in out.stdout and "#SBATCH --partition=gpu" in out.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["launch", "pretrain", "--nodes", "0"], "cluster.nodes"),
        (["launch", "pretrain", "--set", "model.encoder_depth=abc"], "model.encoder_depth"),
        (["launch", "pretrain", "--set", "model.nope=1"], "unknown field 'model.nope'; allowed:"),
        (["launch", "pretrain", "--set", "data.crop=[100,640,1024]"], "data.crop"),
        (["launch", "pretrain", "--strategy", "zero9"], "'zero1', 'zero2', 'zero3' or 'fsdp2'"),
        (["launch", "pretrain", "--zero-stage", "4"], "allowed 1, 2, 3"),
        (["launch", "missing-recipe"], "no recipe named 'missing-recipe'"),
        (["launch", "nowhere/r.yaml"], "does not exist"),
        (["launch", "pretrain", "--name", "$(reboot)"], "field 'name'"),
        (["launch", "pretrain", "--set", "cluster.env.AWS_SECRET_ACCESS_KEY=x"], "credential"),
        (["launch", "pretrain", "--set", "nodes"], "KEY=VALUE"),
    ],
)
def test_bad_input_exit_2_one_line_nothing_written(args: list[str], needle: str, tmp_path: Path) -> None:
    out = seis(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert needle in lines[0]
    assert not (tmp_path / "runs").exists()


def test_recipes_show_and_validate(tmp_path: Path) -> None:
    out = seis("recipes", "show", "smoke", "--set", "train.steps=3", cwd=tmp_path)
    assert out.returncode == 0 and "steps: 3" in out.stdout
    good = seis("recipes", "validate", "smoke", "pretrain", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    (tmp_path / "bad.yaml").write_text("name: x\ntrain: {steps: -1}\n")
    bad = seis("recipes", "validate", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert bad.returncode == 2 and "train.steps" in bad.stderr


def test_cli_start_time_is_small(tmp_path: Path) -> None:
    # Not asserted (timings never are): printed for the record, see the closing notes.
    _, secs = imported_after(["--help"], tmp_path)
    t0 = time.perf_counter()
    seis("--help", cwd=tmp_path)
    print(f"seis --help: {secs:.3f}s in-process, {time.perf_counter() - t0:.3f}s as a subprocess")
