"""seis launch / status / logs / cancel against the real local Slurm cluster (scripts/local-slurm.sh up).

Training jobs run the smoke recipe; the TIMEOUT, cancel, streaming and requeue cases run plain job scripts
(a sleeping or printing srun step) submitted through the same Slurm backend, to keep the suite short. The
TIMEOUT job (over a minute by nature) is submitted when this module starts and checked at its end.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from seiscli.launcher.backends.base import JobState
from seiscli.launcher.backends.slurm import SlurmBackend, query_jobcomp, query_sacct, query_squeue, run_slurm
from seiscli.launcher.jobs import current_statuses
from seiscli.launcher.runs import Run, create_run
from seiscli.recipe import load_recipe

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parent.parent
SMOKE_STEPS = "12"  # enough to see several metrics lines; the recipe's 60 would only cost CI time


def seis(
    *args: str, runs: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        cwd=runs.parent,
        env={**os.environ, "SEIS_RUNS_DIR": str(runs), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status_json(runs: Path, ref: str | None = None, env: dict[str, str] | None = None) -> Any:
    out = seis("status", "--json", *([ref] if ref else []), runs=runs, env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    return rows[0] if ref else rows


def release_requeued(job_id: str) -> None:
    """Let a requeued job start now: Slurm holds it ~2 minutes (BeginTime), long for a test. Not within the
    second of its requeue: slurmd refuses a credential whose creation second is not after the one it revoked
    (slurm_cred.c: `cred->ctime <= j->revoked`), and the new attempt dies at launch with "Job credential revoked"
    (seen in CI)."""
    time.sleep(2)
    out = run_slurm(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    if out.rc != 0:  # fine only if the job left PENDING meanwhile (an earlier release took effect)
        state = run_slurm(["squeue", "-h", "-j", job_id, "-o", "%T"]).out.strip()
        assert state != "PENDING", (out.err, state)


def wait_for(run: Run, states: set[JobState], timeout: float, *, reason: bool = False) -> dict[str, Any]:
    """Poll (in process, one squeue call a second) until the run reaches one of `states`."""
    deadline = time.monotonic() + timeout
    while True:
        sub, st = current_statuses([run])[run.path]
        if st.state in states and (st.reason or not reason):
            return sub
        if time.monotonic() > deadline:
            raise AssertionError(f"{run.id}: still {st} after {timeout} s; wanted {states}")
        time.sleep(1)


def launch(runs: Path, *args: str) -> Run:
    out = seis("launch", "smoke", "--backend", "slurm", "--steps", SMOKE_STEPS, *args, runs=runs)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "job " in out.stdout
    (run,) = [Run(p.parent) for p in runs.glob("*/*/submission.json")]
    return run


_submitted: list[Run] = []


def plain_run(root: Path, name: str, body: str, *sbatch: str, tasks: int = 1) -> Run:
    """A run directory whose job script is a plain srun step (`body` in bash), submitted by the Slurm backend."""
    recipe = load_recipe("smoke", {"name": name, "cluster.backend": "slurm"})
    run = create_run(recipe, root)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks={tasks}",
        f"#SBATCH --output={run.logs_dir}/slurm-%j.out",
        "#SBATCH --open-mode=append",
        *(f"#SBATCH {line}" for line in sbatch),
        "set -euo pipefail",
        f"export SEIS_RUN_DIR={run.path}",
        'echo "batch: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}"',
        f"srun --output={run.logs_dir}/rank-%t.log bash -c {shlex.quote(body)}",
    ]
    (run.path / "job.sbatch").write_text("\n".join(lines) + "\n")
    run.update_submission(backend="slurm", script="job.sbatch")
    SlurmBackend().submit(run)
    _submitted.append(run)
    return run


@dataclass
class EarlyJobs:
    timeout: Run  # one-minute limit, sleeps longer
    forgotten: Run  # fails at once; by the module's end slurmctld has dropped it (MinJobAge)


@pytest.fixture(scope="module", autouse=True)
def early(slurm_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EarlyJobs]:
    """Jobs whose checks need time to pass: submitted when the module starts, checked at its end."""
    root = tmp_path_factory.mktemp("early") / "runs"
    jobs = EarlyJobs(
        timeout=plain_run(root, "sleeper", "echo sleeping; sleep 600", "--time=1"),
        forgotten=plain_run(root, "forgotten", "echo about to fail; exit 3"),
    )
    yield jobs
    for r in _submitted:  # nothing of ours keeps running after the module
        job = r.submission().get("job_id")
        if job:
            run_slurm(["scancel", str(job)])


# -- training jobs -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.slurm(nodes=2)
def test_smoke_on_two_nodes_completes_and_status_and_logs_show_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = launch(runs, "--nodes", "2")
    followed = seis("logs", "-f", "smoke", runs=runs)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert f"step {SMOKE_STEPS}/{SMOKE_STEPS}" in followed.stdout  # rank 0's progress, streamed
    assert "COMPLETED" in followed.stderr

    row = status_json(runs, "smoke")
    assert row["state"] == "COMPLETED" and row["exit_code"] == 0
    assert row["nodes"] == 2 and row["node_list"] == ["node1", "node2"]
    assert row["last_step"] == int(SMOKE_STEPS) and row["samples_per_s"] > 0
    assert [h["state"] for h in row["history"]][-1] == "COMPLETED"
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert {m["world_size"] for m in metrics} == {4}  # 2 nodes x 2 processes, one torch.distributed job

    table = seis("status", runs=runs)
    assert table.returncode == 0 and run.id in table.stdout and "COMPLETED" in table.stdout
    # The second node's ranks (2 and 3 with 2 per node), and one rank's last lines.
    node2 = seis("logs", "smoke", "--node", "node2", runs=runs)
    assert node2.returncode == 0 and "rank-2.log" in node2.stdout and "rank-3.log" in node2.stdout
    assert "rank-0.log" not in node2.stdout
    last = seis("logs", "smoke", "--rank", "0", "--tail", "1", runs=runs)
    assert last.returncode == 0 and len(last.stdout.strip().splitlines()) == 1
    bad_node = seis("logs", "smoke", "--node", "node9", runs=runs)
    assert bad_node.returncode == 2 and "node1, node2" in bad_node.stderr


@pytest.mark.slow
def test_smoke_on_one_node_completes(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = launch(runs, "--nodes", "1")
    sub = wait_for(run, {JobState.COMPLETED, JobState.FAILED}, 300)
    assert sub["state"] == "COMPLETED", seis("logs", "smoke", runs=runs).stdout
    row = status_json(runs, "smoke")
    assert row["nodes"] == 1 and row["last_step"] == int(SMOKE_STEPS)
    assert json.loads(run.metrics_path.read_text().splitlines()[-1])["world_size"] == 2


def test_bad_data_path_fails_with_exit_code_and_error_line(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    launch(runs, "--nodes", "1", "--set", "data.source=mdio", "--set", 'data.uris=["/nonexistent/x.mdio"]')
    followed = seis("logs", "-f", "smoke", runs=runs)
    assert followed.returncode != 0  # the job's status, not seis's
    row = status_json(runs, "smoke")
    assert row["state"] == "FAILED" and row["exit_code"] not in (None, 0)
    assert "/nonexistent/x.mdio" in row["error_line"]
    text = seis("status", "smoke", runs=runs).stdout
    assert f"FAILED (exit {row['exit_code']})" in text and "/nonexistent/x.mdio" in text


def test_pending_shows_reason_and_cancel_ends_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = launch(runs, "--nodes", "5")  # more nodes than the cluster has: pends with a reason, uses nothing
    wait_for(run, {JobState.PENDING}, 60, reason=True)
    row = status_json(runs)[0]
    assert row["state"] == "PENDING" and row["reason"]  # e.g. PartitionNodeLimit
    assert f"PENDING ({row['reason']})" in seis("status", runs=runs).stdout
    out = seis("cancel", "smoke", runs=runs)
    assert out.returncode == 0 and "CANCELLED" in out.stdout, out.stdout + out.stderr
    assert status_json(runs, "smoke")["state"] == "CANCELLED"
    again = seis("cancel", "smoke", runs=runs)
    assert again.returncode == 0 and "already ended" in again.stdout


def test_sbatch_refusal_marks_submit_failed_and_shows_its_stderr(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    out = seis("launch", "smoke", "--backend", "slurm", "--set", "cluster.partition=nope", runs=runs)
    assert out.returncode == 1
    assert "invalid partition" in (out.stdout + out.stderr).lower()
    (sub_path,) = runs.glob("smoke/*/submission.json")
    sub = json.loads(sub_path.read_text())
    assert sub["state"] == "SUBMIT_FAILED" and "job_id" not in sub and "partition" in sub["error"].lower()
    row = status_json(runs, "smoke")
    assert row["state"] == "SUBMIT_FAILED" and "partition" in row["reason"].lower()


# -- plain job scripts -------------------------------------------------------------------------------------


def test_logs_follow_streams_a_running_job_and_exits_with_its_status(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    go = tmp_path / "go"
    # The job prints, then waits for the test to have *read* that line through `seis logs -f` before it ends:
    # only streaming can pass (a reader that prints at the end would leave the job waiting and exiting 7).
    wait_go = f"for i in $(seq 600); do [ -e {go} ] && break; sleep 0.1; done"
    body = f"echo tick 1; {wait_go}; [ -e {go} ] || exit 7; echo tick 2"
    run = plain_run(runs, "streamer", body)
    proc = subprocess.Popen(
        [sys.executable, "-m", "seiscli", "logs", "-f", "streamer"],
        env={**os.environ, "SEIS_RUNS_DIR": str(runs)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == "tick 1":
                go.touch()
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "tick 1\n" in seen and "tick 2" in rest, (seen, rest, err)
    assert proc.returncode == 0, err
    assert current_statuses([run])[run.path][1].state == JobState.COMPLETED


def test_cancel_a_running_job(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = plain_run(runs, "victim", "echo started; sleep 600")
    wait_for(run, {JobState.RUNNING}, 60)
    out = seis("cancel", run.id, runs=runs)
    assert out.returncode == 0 and "CANCELLED" in out.stdout, out.stdout + out.stderr
    row = status_json(runs, run.id)
    assert row["state"] == "CANCELLED"
    assert seis("logs", "-f", run.id, runs=runs).returncode == 1  # not COMPLETED: non-zero


def test_requeue_on_usr1_after_checkpoint(tmp_path: Path) -> None:
    """`--signal=USR1@50 --requeue` with a one-minute limit: USR1 arrives, the job 'checkpoints', rank 0 calls
    slurm_requeue.requeue(), Slurm requeues it, and the next attempt resumes and completes."""
    runs = tmp_path / "runs"
    job = (
        "import os, sys, time\n"
        "from seiscli.train.slurm_requeue import UsrSignal, requeue, restart_count\n"
        "flag = UsrSignal()\n"
        "ckpt = os.path.join(os.environ['SEIS_RUN_DIR'], 'checkpoint.txt')\n"
        "print('attempt', restart_count(), flush=True)\n"
        "if os.path.exists(ckpt):\n"
        "    print('resumed from', open(ckpt).read(), flush=True)\n"
        "    sys.exit(0)\n"
        "step = 0\n"
        "while not flag.received and step < 1200:\n"
        "    time.sleep(0.1)\n"
        "    step += 1\n"
        "if not flag.received:\n"
        "    sys.exit(5)\n"
        "open(ckpt, 'w').write(f'step {step}')\n"
        "print('USR1: checkpoint written; requeued', requeue(), flush=True)\n"
        "time.sleep(120)\n"  # Slurm ends this attempt
    )
    run = plain_run(
        runs, "requeuer", f"exec python3 -c {shlex.quote(job)}", "--time=1", "--signal=USR1@50", "--requeue"
    )
    job_id = run.submission()["job_id"]
    wait_for(run, {JobState.REQUEUED}, 150)
    row = status_json(runs, run.id)
    assert row["state"] == "REQUEUED" and row["restarts"] == 1
    assert "REQUEUED (restart 1" in seis("status", runs=runs).stdout
    release_requeued(job_id)
    wait_for(run, {JobState.COMPLETED, JobState.FAILED}, 120)
    row = status_json(runs, run.id)
    assert row["state"] == "COMPLETED" and row["restarts"] == 1
    assert "REQUEUED" in [h["state"] for h in row["history"]]
    batch = (run.logs_dir / f"slurm-{job_id}.out").read_text()
    assert "restart 0" in batch and "restart 1" in batch
    logs = seis("logs", run.id, "--rank", "0", runs=runs).stdout
    assert "resumed from step" in logs


def test_requeue_is_a_no_op_outside_slurm_and_off_rank_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    from seiscli.train.slurm_requeue import requeue

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue() is False
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    assert requeue(rank=3) is False


def test_each_source_reports_a_finished_job_and_sacct_off_degrades(tmp_path: Path, slurm_cluster: Any) -> None:
    runs = tmp_path / "runs"
    run = plain_run(runs, "quick", "echo done; exit 3")
    wait_for(run, {JobState.FAILED}, 60)
    job = run.submission()["job_id"]
    time.sleep(1)  # the jobcomp line is written as the job record closes
    sq = query_squeue([job])[job]
    assert (sq.state, sq.exit_code, sq.source) == (JobState.FAILED, 3, "squeue")
    comp = query_jobcomp([job])[job][-1]
    assert (comp.state, comp.exit_code, comp.source) == (JobState.FAILED, 3, "jobcomp")
    acct = query_sacct([job])
    if slurm_cluster.accounting:
        assert acct is not None
        assert (acct[job][-1].state, acct[job][-1].exit_code) == (JobState.FAILED, 3)
    else:
        assert acct is None
    # The client tools read slurm.conf: a copy without accounting makes sacct answer "disabled", as on a
    # cluster without slurmdbd; status still answers.
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf").read_text()
    no_acct = tmp_path / "slurm.conf"
    no_acct.write_text(conf.replace("accounting_storage/slurmdbd", "accounting_storage/none"))
    env = {"SLURM_CONF": str(no_acct)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from seiscli.launcher.backends.slurm import query_sacct; print(query_sacct([{job!r}]))",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "None", probe.stderr
    run.update_submission(state="RUNNING")  # as if never seen finished: status must ask the scheduler again
    row = status_json(runs, run.id, env=env)
    assert row["state"] == "FAILED" and row["exit_code"] == 3


def test_jobs_the_scheduler_forgot_keep_their_stored_state(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    recipe = load_recipe("smoke", {"name": "old", "cluster.backend": "slurm"})
    done = create_run(recipe, runs)
    done.update_submission(backend="slurm", job_id="987654321", state="COMPLETED", exit_code=0)
    lost = create_run(recipe, runs)
    lost.update_submission(backend="slurm", job_id="987654322", state="RUNNING")
    rows = {r["run"]: r for r in status_json(runs)}
    assert rows[done.id]["state"] == "COMPLETED"
    assert rows[lost.id]["state"] == "UNKNOWN" and "last seen RUNNING" in rows[lost.id]["reason"]
    assert lost.submission()["state"] == "RUNNING"  # not overwritten by a guess


def test_status_of_fifty_runs_asks_the_scheduler_once_without_torch(tmp_path: Path) -> None:
    """50 unfinished runs (so every one needs the scheduler): one squeue call, at most one sacct call, no torch.
    Prints the wall time (the figure for the report); timings are not asserted."""
    runs = tmp_path / "runs"
    recipe = load_recipe("smoke", {"name": "many", "cluster.backend": "slurm"})
    live = plain_run(tmp_path / "live", "live", "sleep 60")
    wait_for(live, {JobState.RUNNING}, 60)
    for i in range(50):
        run = create_run(recipe, runs)
        job = live.submission()["job_id"] if i % 2 else str(900000 + i)
        run.update_submission(backend="slurm", job_id=job, state="RUNNING", submitted=time.time())
        run.metrics_path.write_text(json.dumps({"step": i, "samples_per_s": 1.0 + i}) + "\n")
    shims = tmp_path / "shims"
    shims.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("squeue", "sacct", "scontrol", "sinfo"):
        real = shutil.which(tool)
        (shims / tool).write_text(f'#!/bin/sh\necho {tool} >> {calls}\nexec {real} "$@"\n')
        (shims / tool).chmod(0o755)
    code = (
        "import sys, time, json; t = time.perf_counter(); sys.argv = ['seis', 'status', '--json']\n"
        "from seiscli.launcher.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('\\nHEAVY', json.dumps([m for m in ('torch', 'deepspeed', 'zarr', 'numpy') if m in sys.modules]),"
        " time.perf_counter() - t)"
    )
    env = {**os.environ, "SEIS_RUNS_DIR": str(runs), "PATH": f"{shims}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    body, _, tail = out.stdout.rpartition("\nHEAVY ")
    heavy, in_process = tail.split(" ")
    assert json.loads(heavy) == []
    rows = json.loads(body)
    assert len(rows) == 50
    assert {r["state"] for r in rows} == {"RUNNING", "UNKNOWN"}
    tools = calls.read_text().split()
    assert tools.count("squeue") == 1 and tools.count("sacct") <= 1 and "scontrol" not in tools, tools
    print(f"\nseis status --json, 50 runs: {wall:.3f} s wall (subprocess), {float(in_process):.3f} s in process")
    run_slurm(["scancel", live.submission()["job_id"]])


def test_timeout_shows_timeout(early: EarlyJobs) -> None:
    """Near the end of the module: the one-minute job has been running beside the other tests."""
    run = early.timeout
    wait_for(run, {JobState.TIMEOUT, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}, 200)
    row = status_json(run.path.parent.parent, run.id)
    assert row["state"] == "TIMEOUT"
    assert "TIME LIMIT" in row["error_line"]
    assert run.submission()["state"] == "TIMEOUT"


def test_a_job_slurmctld_forgot_is_answered_by_sacct_then_jobcomp(early: EarlyJobs, tmp_path: Path) -> None:
    """Last: the failed job submitted at the start has aged out of slurmctld (MinJobAge); nobody looked at it
    meanwhile, so its run still says PENDING. Accounting answers, or without it the jobcomp log does."""
    run, runs = early.forgotten, early.forgotten.path.parent.parent
    job = run.submission()["job_id"]
    deadline = time.monotonic() + 150
    while query_squeue([job]) and time.monotonic() < deadline:
        time.sleep(2)
    assert not query_squeue([job]), "slurmctld still holds the job; is MinJobAge=30 in slurm.conf?"
    assert run.submission()["state"] == "PENDING"
    conf = Path(os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf").read_text()
    no_acct = tmp_path / "no-accounting.conf"
    no_acct.write_text(conf.replace("accounting_storage/slurmdbd", "accounting_storage/none"))
    nothing = tmp_path / "nothing.conf"
    nothing.write_text(no_acct.read_text().replace("jobcomp/filetxt", "jobcomp/none"))

    row = status_json(runs, run.id, env={"SLURM_CONF": str(nothing)})  # no source knows it: say so
    assert row["state"] == "UNKNOWN" and "last seen PENDING" in row["reason"]
    row = status_json(runs, run.id, env={"SLURM_CONF": str(no_acct)})
    assert (row["state"], row["exit_code"], row["source"]) == ("FAILED", 3, "jobcomp")
    run.update_submission(state="PENDING")
    row = status_json(runs, run.id)
    assert (row["state"], row["exit_code"]) == ("FAILED", 3)
    assert row["source"] == ("sacct" if query_sacct([job]) is not None else "jobcomp")
    assert "exit code 3" in row["error_line"]  # srun's own line: the job printed no exception
