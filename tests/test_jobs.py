"""Status, logs and cancel without a cluster: parsing of Slurm's outputs, the stored state, log discovery and
following, and the local backend's logs (the Slurm side runs for real in test_slurm.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from seiscli.launcher.backends.base import JobState, JobStatus
from seiscli.launcher.backends.slurm import (
    _exit_pair,
    _wait_status,
    expand_hostlist,
    map_state,
    parse_duration,
    query_jobcomp,
    slurm_conf_value,
)
from seiscli.launcher.jobs import (
    SETTLED,
    _Follower,
    current_statuses,
    error_line,
    exit_status,
    log_files,
    record,
    state_label,
    stored_status,
)
from seiscli.launcher.runs import Run, create_run
from seiscli.recipe import load_recipe

HEAVY = ("torch", "deepspeed", "zarr", "numpy")


def seis(*args: str, runs: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        cwd=runs.parent,
        env={**os.environ, "SEIS_RUNS_DIR": str(runs), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def slurm_run(root: Path, name: str = "r", **sub: Any) -> Run:
    run = create_run(load_recipe("smoke", {"name": name, "cluster.backend": "slurm"}), root)
    run.update_submission(backend="slurm", **sub)
    return run


# -- Slurm's words ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "restarts", "state"),
    [
        ("PENDING", 0, JobState.PENDING),
        ("PENDING", 1, JobState.REQUEUED),
        ("RUNNING", 2, JobState.RUNNING),
        ("COMPLETING", 0, JobState.RUNNING),
        ("CANCELLED by 0", 0, JobState.CANCELLED),
        ("CANCELLED+", 0, JobState.CANCELLED),
        ("TIMEOUT", 0, JobState.TIMEOUT),
        ("NODE_FAIL", 0, JobState.NODE_FAIL),
        ("BOOT_FAIL", 0, JobState.NODE_FAIL),
        ("OUT_OF_MEMORY", 0, JobState.OUT_OF_MEMORY),
        ("REQUEUE_HOLD", 0, JobState.REQUEUED),
        ("SPECIAL_EXIT", 0, JobState.FAILED),
        ("SOMETHING_NEW", 0, JobState.UNKNOWN),
        ("", 0, JobState.UNKNOWN),
    ],
)
def test_slurm_states_map_to_seis_states(raw: str, restarts: int, state: JobState) -> None:
    assert map_state(raw, restarts) == state


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("node[1-3,7]", ["node1", "node2", "node3", "node7"]),
        ("gpu-a[01-02],login", ["gpu-a01", "gpu-a02", "login"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("ip-10-0-1-5", ["ip-10-0-1-5"]),
        ("", []),
        ("(null)", []),
    ],
)
def test_hostlists_expand_like_scontrol(text: str, names: list[str]) -> None:
    assert expand_hostlist(text) == names


def test_durations_and_exit_codes() -> None:
    assert parse_duration("1-02:03:04") == 93784
    assert parse_duration("02:03") == 123
    assert parse_duration("UNLIMITED") is None
    assert _wait_status("768") == (3, None)  # squeue's raw wait status
    assert _wait_status("15") == (0, 15)
    assert _exit_pair("3:0") == (3, None)  # sacct / scontrol / jobcomp
    assert _exit_pair("0:9") == (0, 9)


def test_jobcomp_log_is_found_through_slurm_conf_and_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "jobcomp.txt"
    # Lines as slurm 22.05's jobcomp/filetxt writes them: a requeue logs JobState=PENDING, then the final state.
    common = "UserId=root(0) GroupId=root(0) Partition=debug TimeLimit=1 NodeCnt=1 ProcCnt=1 WorkDir=/tmp/a b"
    log.write_text(
        f"JobId=7 {common} Name=x JobState=PENDING StartTime=2026-11-24T15:29:01 EndTime=2026-11-24T15:29:18 "
        "NodeList=node1 DerivedExitCode=0:0 ExitCode=0:0 \n"
        f"JobId=7 {common} Name=x JobState=COMPLETED StartTime=2026-11-24T15:30:08 EndTime=2026-11-24T15:30:18 "
        "NodeList=node1 DerivedExitCode=0:0 ExitCode=0:0 \n"
        f"JobId=8 {common} Name=y JobState=FAILED StartTime=2026-11-24T15:35:00 EndTime=2026-11-24T15:35:02 "
        "NodeList=node[1-2] DerivedExitCode=0:0 ExitCode=3:0 \n"
    )
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=x\nJobCompType=jobcomp/filetxt  # comment\nJobCompLoc={log}\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert slurm_conf_value("jobcomploc") == str(log)
    found = query_jobcomp(["7", "8", "9"])
    assert set(found) == {"7", "8"}
    first, last = found["7"]
    assert first.state == JobState.REQUEUED and last.state == JobState.COMPLETED and last.restarts == 1
    assert last.elapsed_s == 10 and last.nodes == ["node1"]
    (failed,) = found["8"]
    assert (failed.state, failed.exit_code, failed.nodes) == (JobState.FAILED, 3, ["node1", "node2"])
    conf.write_text("JobCompType=jobcomp/none\n")
    assert query_jobcomp(["7"]) == {}


# -- stored state ----------------------------------------------------------------------------------------


def test_record_appends_history_on_transitions_only(tmp_path: Path) -> None:
    run = slurm_run(tmp_path, job_id="5", state="PENDING")
    sub = run.submission()
    sub = record(run, sub, JobStatus(JobState.RUNNING, nodes=["node1"], source="squeue", start_time=100.0))
    mtime = run.submission_path.stat().st_mtime_ns
    sub = record(run, sub, JobStatus(JobState.RUNNING, nodes=["node1"], source="squeue", elapsed_s=5))
    assert run.submission_path.stat().st_mtime_ns == mtime  # nothing changed: nothing written
    record(run, sub, JobStatus(JobState.FAILED, exit_code=3, source="sacct", end_time=200.0))
    saved = run.submission()
    assert [(h["state"], h["at"]) for h in saved["history"]] == [("RUNNING", 100.0), ("FAILED", 200.0)]
    assert (saved["state"], saved["exit_code"], saved["node_list"]) == ("FAILED", 3, ["node1"])
    assert stored_status(saved).state == JobState.FAILED


def test_settled_runs_are_not_asked_about_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[list[str]] = []

    class Recorder:
        def statuses(self, runs: list[Run]) -> dict[Path, JobStatus]:
            asked.append([r.submission()["job_id"] for r in runs])
            return {r.path: JobStatus(JobState.RUNNING, source="squeue") for r in runs}

    monkeypatch.setattr("seiscli.launcher.backends.get_backend", lambda name: Recorder())
    runs = [slurm_run(tmp_path, job_id=str(i), state=s.value) for i, s in enumerate(JobState)]
    current_statuses(runs)
    unsettled = [str(i) for i, s in enumerate(JobState) if s not in SETTLED]
    assert asked == [unsettled]  # one batched question, for the unfinished ones only


def test_labels_and_exit_status() -> None:
    assert state_label(JobStatus(JobState.PENDING, reason="Resources")) == "PENDING (Resources)"
    assert state_label(JobStatus(JobState.FAILED, exit_code=3)) == "FAILED (exit 3)"
    assert (
        state_label(JobStatus(JobState.REQUEUED, restarts=1, reason="BeginTime")) == "REQUEUED (restart 1, BeginTime)"
    )
    assert state_label(JobStatus(JobState.CANCELLED, signal=15)) == "CANCELLED (signal 15)"
    assert exit_status(JobStatus(JobState.COMPLETED)) == 0
    assert exit_status(JobStatus(JobState.FAILED, exit_code=3)) == 3
    assert exit_status(JobStatus(JobState.FAILED, exit_code=0)) == 1
    assert exit_status(JobStatus(JobState.TIMEOUT)) == 1
    assert exit_status(JobStatus(JobState.CANCELLED)) == 1


# -- logs ------------------------------------------------------------------------------------------------


def test_error_line_is_the_lowest_ranks_exception(tmp_path: Path) -> None:
    run = slurm_run(tmp_path, job_id="12", state="FAILED")
    logs = run.logs_dir
    (logs / "slurm-12.out").write_text("seis: job 12\nsrun: error: node1: task 1: Exited with exit code 1\n")
    (logs / "rank-0.log").write_text("step 1\nTraceback (most recent call last):\n  File x\nValueError: bad crop\n")
    (logs / "rank-1.log").write_text("RuntimeError: peer went away\n")
    assert error_line(run) == "ValueError: bad crop"
    (logs / "rank-0.log").write_text("step 1\n")
    (logs / "rank-1.log").write_text("step 1\n")
    assert error_line(run) == "error: node1: task 1: Exited with exit code 1"


def test_log_files_by_rank_and_node(tmp_path: Path) -> None:
    run = slurm_run(tmp_path, job_id="3", state="RUNNING")  # smoke: 2 processes per node
    for name in ("slurm-3.out", "rank-0.log", "rank-1.log", "rank-2.log", "rank-3.log"):
        (run.logs_dir / name).write_text(name + "\n")
    names = lambda files: [f.name for f in files]  # noqa: E731
    assert names(log_files(run)) == ["slurm-3.out", "rank-0.log"]
    assert names(log_files(run, rank=3)) == ["rank-3.log"]
    assert names(log_files(run, node="node2", node_list=["node1", "node2"])) == ["rank-2.log", "rank-3.log"]
    assert names(log_files(run, all_ranks=True)) == [
        "slurm-3.out",
        "rank-0.log",
        "rank-1.log",
        "rank-2.log",
        "rank-3.log",
    ]


def test_follower_prints_whole_lines_and_survives_truncation(tmp_path: Path) -> None:
    out = io.StringIO()
    f = _Follower(out, multi=False)
    p = tmp_path / "rank-0.log"
    p.write_text("one\ntwo\nthr")
    f.start(p, tail=1)
    assert out.getvalue() == "two\n"  # the last complete line; the partial one waits
    with p.open("a") as fh:
        fh.write("ee\n")
    f.poll(p)
    assert out.getvalue() == "two\nthree\n"
    p.write_text("again\n")  # a requeued attempt rewrote the file
    f.poll(p)
    assert out.getvalue().endswith("three\nagain\n")


def test_logs_rejects_bad_arguments_with_exit_2(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    slurm_run(runs, "r", job_id="1", state="COMPLETED")
    for args, needle in [
        (["logs", "r", "--rank", "-1"], "--rank -1"),
        (["logs", "r", "--rank", "0", "--node", "node1"], "one of them"),
        (["logs", "r", "--tail", "-3"], "--tail -3"),
        (["logs", "nope"], "no run 'nope'"),
        (["status", "nope"], "no run 'nope'"),
        (["cancel", "nope"], "no run 'nope'"),
    ]:
        out = seis(*args, runs=runs)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1


def test_local_run_logs_follow_and_rank_files(tmp_path: Path) -> None:
    """A local-backend run (a short script in place of torchrun, writing torchrun's per-rank layout)."""
    from seiscli.launcher.backends.local import LocalBackend

    runs = tmp_path / "runs"
    run = create_run(load_recipe("smoke", {"name": "loc"}), runs)
    rank1 = run.logs_dir / "ranks" / "abc_x" / "attempt_0" / "1"
    (run.path / "launch.sh").write_text(
        f"mkdir -p {rank1}\necho 'rank one says hi' > {rank1}/stdout.log\n: > {rank1}/stderr.log\n"
        "for i in 1 2 3; do echo line $i; sleep 0.3; done\n"
        f'echo \'{{"status": "completed"}}\' > {run.path}/summary.json\n'
    )
    run.update_submission(backend="local", script="launch.sh")
    LocalBackend().submit(run)
    followed = seis("logs", "-f", "loc", runs=runs)
    assert followed.returncode == 0, followed.stderr
    assert "line 1\nline 2\nline 3\n" in followed.stdout
    assert "rank one says hi" in seis("logs", "loc", "--rank", "1", runs=runs).stdout
    assert seis("logs", "loc", "--node", "elsewhere", runs=runs).returncode == 2


@pytest.mark.slow
def test_local_smoke_logs_per_rank_from_torchrun(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    out = seis("launch", "smoke", "--steps", "3", "--detach", runs=runs, timeout=300)
    assert out.returncode == 0, out.stderr
    followed = seis("logs", "-f", "smoke", runs=runs, timeout=300)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    rank0 = seis("logs", "smoke", "--rank", "0", runs=runs)
    assert rank0.returncode == 0 and "step 3/3" in rank0.stdout  # from torchrun's per-rank file, not job.out
    assert "/ranks/" in rank0.stdout and "/0/stdout.log" in rank0.stdout
    (run,) = [Run(p.parent) for p in runs.glob("smoke/*/submission.json")]
    assert [(p.parent.name, p.name) for p in log_files(run, rank=1)] == [("1", "stdout.log"), ("1", "stderr.log")]
    assert json.loads(seis("status", "--json", "smoke", runs=runs).stdout)[0]["state"] == "COMPLETED"


# -- the launcher's side -----------------------------------------------------------------------------------


def test_status_of_fifty_finished_runs_reads_only_files_and_imports_no_torch(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for i in range(50):
        run = slurm_run(runs, "many", job_id=str(100 + i), state="COMPLETED", exit_code=0, submitted=time.time())
        run.metrics_path.write_text(json.dumps({"step": i, "samples_per_s": 2.0}) + "\n")
    code = (
        "import sys, json; sys.argv = ['seis', 'status', '--json']\n"
        "from seiscli.launcher.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print('\\nHEAVY', json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    # No Slurm tool on PATH: settled runs never need one.
    env = {**os.environ, "SEIS_RUNS_DIR": str(runs), "PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    body, _, heavy = out.stdout.rpartition("\nHEAVY ")
    assert json.loads(heavy) == [], out.stderr
    rows = json.loads(body)
    assert len(rows) == 50 and {r["state"] for r in rows} == {"COMPLETED"}
    assert sorted(r["last_step"] for r in rows) == list(range(50))


def test_launch_without_sbatch_is_a_submit_failure(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    out = seis("launch", "smoke", "--backend", "slurm", runs=runs, env={"PATH": str(tmp_path)})
    assert out.returncode == 1 and "sbatch not found" in out.stdout
    (sub,) = runs.glob("smoke/*/submission.json")
    saved = json.loads(sub.read_text())
    assert saved["state"] == "SUBMIT_FAILED" and "job_id" not in saved


def test_usr1_flag_and_requeue_outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    from seiscli.train.slurm_requeue import UsrSignal, requeue

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        flag = UsrSignal()
        assert not flag.received
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.received
    finally:
        signal.signal(signal.SIGUSR1, previous)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue() is False
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert requeue() is False  # only rank 0 asks
