"""`seis logs --errors/--grep` and `seis top`: on the real local Slurm cluster (a 2-node training job whose rank 1
is killed mid-run), on EKS pod logs through the Kubernetes client, and on logs of several attempts; light and
quick with 50 recorded runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from seiscli.launcher.backends.base import JobState
from seiscli.launcher.backends.slurm import run_slurm
from seiscli.launcher.errors_scan import classify, slurm_failures
from seiscli.launcher.jobs import current_statuses
from seiscli.launcher.runs import Run, create_run
from seiscli.recipe import load_recipe
from tests.test_hyperpod_eks import FakeApi, k8s  # noqa: F401  (the fixture)

HEAVY = ("torch", "deepspeed", "zarr", "numpy", "mdio", "s3fs", "matplotlib")


def seis(*args: str, runs: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        cwd=runs.parent,
        env={**os.environ, "SEIS_RUNS_DIR": str(runs)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pid_of_rank(job_id: str, rank: int, node: str, timeout: float = 60) -> int:
    """The process of one global rank, as the slurmd of its node knows it (scontrol listpids)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = run_slurm(["scontrol", "listpids", job_id, node])
        for line in res.out.splitlines()[1:]:
            cols = line.split()
            if len(cols) == 5 and cols[2] == "0" and cols[4] == str(rank):
                return int(cols[0])
        time.sleep(1)
    raise AssertionError(f"job {job_id}: no process of rank {rank}: {res.out} {res.err}")


def _wait_step(run: Run, step: int, timeout: float) -> None:
    """Until metrics.jsonl has `step` (other helpers' jobs may hold the nodes first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run.last_metrics().get("step") or 0) >= step:
            return
        _, st = current_statuses([run])[run.path]
        assert not st.state.finished, f"{run.id} ended {st.state.value} before step {step}"
        time.sleep(1)
    raise AssertionError(f"{run.id}: no step {step} after {timeout} s")


@pytest.mark.slow
@pytest.mark.slurm(nodes=2)
def test_top_follows_a_two_node_job_and_errors_name_the_killed_rank(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    out = seis(
        "launch", "smoke", "--backend", "slurm", "--nodes", "2", "--steps", "5000",
        "--set", "cluster.cpu_procs_per_node=1", "--set", "cluster.max_retries=0", "--name", "topkill", runs=runs,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = [Run(p.parent) for p in runs.glob("topkill/*/submission.json")]
    job = str(run.submission()["job_id"])
    live: subprocess.Popen[str] | None = None
    try:
        _wait_step(run, 5, timeout=600)
        view = seis("top", "topkill", "--once", "--json", runs=runs)
        assert view.returncode == 0, view.stderr
        snap = json.loads(view.stdout)
        assert snap["state"] == "RUNNING" and snap["job_id"] == job and snap["steps_planned"] == 5000
        assert snap["step"] >= 5 and snap["loss"] > 0 and snap["samples_per_s"] > 0
        assert 0 <= snap["data_wait_fraction"] < 1 and snap["straggler_ratio"] >= 1
        assert [(n["node"], n["ranks"]) for n in snap["nodes"]] == [("node1", 1), ("node2", 1)]
        assert sorted(r["rank"] for r in snap["slowest"]) == [0, 1]
        assert {r["node"] for r in snap["slowest"]} == {"node1", "node2"}
        text = seis("top", "topkill", "--once", runs=runs)
        assert text.returncode == 0 and "node2" in text.stdout and "slowest ranks" in text.stdout

        # The live view runs until the job ends; rank 1 is then killed from outside (as the OOM killer would).
        live = subprocess.Popen(
            [sys.executable, "-m", "seiscli", "top", "topkill", "--interval", "0.5"],
            env={**os.environ, "SEIS_RUNS_DIR": str(runs)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert live.poll() is None  # still watching a running job
        os.kill(_pid_of_rank(job, 1, "node2"), signal.SIGKILL)
        code = live.wait(timeout=180)
        assert code == 1, live.stderr.read() if live.stderr else ""  # the job did not complete
    finally:
        if live is not None and live.poll() is None:
            live.kill()
        run_slurm(["scancel", job])
    _, st = current_statuses([run])[run.path]
    assert st.state in (JobState.FAILED, JobState.CANCELLED), st

    errors = seis("logs", "topkill", "--errors", "--json", runs=runs)
    assert errors.returncode == 0, errors.stderr
    (attempt,) = json.loads(errors.stdout)["attempts"]
    first = attempt["first"]
    assert (first["rank"], first["node"], first["attempt"]) == (1, "node2", 1), first
    assert "Killed" in (first["exit"] or first["text"])
    (rank0,) = attempt["consequences"]
    assert rank0["rank"] == 0 and rank0["node"] == "node1" and rank0["kind"] in ("peer", "killed", "cancelled")
    human = seis("logs", "topkill", "--errors", runs=runs)
    assert human.stdout.startswith("first error: rank 1 on node2, attempt 1") and "as a consequence" in human.stdout

    found = seis("logs", "topkill", "--grep", r"task 1: Killed", runs=runs)
    assert found.returncode == 0 and f"logs/slurm-{job}.out" in found.stdout
    started = seis("logs", "topkill", "--grep", r"seis: rank \d on node\d started", runs=runs)
    assert sorted(line.split()[1] for line in started.stdout.splitlines()) == ["0", "1"]  # both ranks, by rank
    assert seis("logs", "topkill", "--grep", "no such text anywhere", runs=runs).returncode == 1
    bad = seis("logs", "topkill", "--grep", "(", runs=runs)
    assert bad.returncode == 2 and "--grep" in bad.stderr


# -- several attempts, from the files alone ----------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_first_error_across_attempts_by_time_and_peer_errors_are_consequences(tmp_path: Path) -> None:
    """Two attempts appended to the same files, as Slurm's requeue leaves them: attempt 1 dies of rank 2's
    ValueError (its gloo-timeout peers stamped later, and one stamped *earlier* but only a peer error);
    attempt 2 dies of a time limit (its batch line in the older format, without `attempt K`)."""
    logs = tmp_path / "logs"
    mark = "seis: rank {r} on {n} {w} at 2026-12-02T10:{m}+00:00 (attempt {a})"
    peer = "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6834"
    tb = ["Traceback (most recent call last):", '  File "trainer.py", line 1, in run']
    for r, node in enumerate(["n1", "n1", "n2", "n2"]):
        lines = [mark.format(r=r, n=node, w="started", m="00:00", a=1), "step 1/10 loss 1.0"]
        if r == 2:
            lines += [*tb, "ValueError: crop outside the volume", mark.format(r=r, n=node, w="failed", m="05:01", a=1)]
        elif r == 3:  # a peer error stamped before the real one: still only a symptom
            lines += [*tb, peer, mark.format(r=r, n=node, w="failed", m="05:00", a=1)]
        else:
            lines += [*tb, peer, mark.format(r=r, n=node, w="failed", m=f"05:0{2 + r}", a=1)]
        lines += [mark.format(r=r, n=node, w="started", m="10:00", a=2), "step 1/10 loss 1.0"]
        if r == 0:
            lines.append(
                "slurmstepd-n1: error: *** STEP 7.0 ON n1 CANCELLED AT 2026-12-02T10:40:00 DUE TO TIME LIMIT ***"
            )
        _write(logs / f"rank-{r}.log", lines)
    _write(
        logs / "slurm-7.out",
        [
            "seis: job 7 attempt 1 on n[1-2] (restart 0), rendezvous n1:20007",
            "srun: error: n2: task 2: Exited with exit code 1",
            "srun: launch/slurm: _step_signal: Terminating StepId=7.0",
            "srun: error: n2: task 3: Exited with exit code 1",
            "srun: error: n1: tasks 0-1: Exited with exit code 1",
            "seis: job 7 on n[1-2] (restart 1), rendezvous n1:20007",
            "slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026-12-02T10:40:00 DUE TO TIME LIMIT ***",
        ],
    )
    a0, a1 = classify(slurm_failures(logs, "7"))
    assert (a0.first.rank, a0.first.node, a0.first.text) == (2, "n2", "ValueError: crop outside the volume")
    assert a0.first.exit == "Exited with exit code 1" and a0.first.context[0].startswith("Traceback")
    assert sorted((f.rank, f.kind) for f, _ in a0.consequences) == [(0, "peer"), (1, "peer"), (3, "peer")]
    assert (a0.attempt, a1.attempt) == (1, 2) and a1.first.kind == "cancelled" and "TIME LIMIT" in a1.first.text


TORCHRUN_SUMMARY = """\
[default0]:Traceback (most recent call last):
[default0]:RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:52390.
[default0]:python -m seiscli.train: error: RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer
[default0]:seis: rank 0 on vm failed at 2026-12-02T15:12:41.347685+00:00 (attempt 1)
E1202 15:12:41.723000 30650 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
seiscli.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-02_15:12:41
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 3 (pid: 30919)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_15:12:41
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 30920)  (SIGKILL)
  traceback : Signal 9 (SIGKILL) received by PID 30920
============================================================
"""


def test_torchrun_summary_names_the_killed_rank_and_the_peer_error_follows() -> None:
    """What torchrun printed (job.out of a local run whose rank 1 was SIGKILLed: the SEIS_FAULT=kill hook)."""
    from seiscli.launcher.errors_scan import pod_failures

    (a,) = classify(pod_failures([("job.out", "vm", TORCHRUN_SUMMARY)], per_node=2))
    assert (a.first.rank, a.first.exit, a.first.kind) == (1, "signal 9", "error")
    ((rank0, why),) = a.consequences
    assert rank0.rank == 0 and rank0.kind == "peer" and rank0.exit == "exit code 3" and "peer" in why
    assert rank0.text.startswith("RuntimeError") and rank0.time is not None  # its own words, the agent's exit


# -- EKS: the same answer from pod logs ----------------------------------------------------------------------


def test_errors_and_grep_on_eks_pod_logs(k8s: tuple[FakeApi, dict[str, str]]) -> None:  # noqa: F811
    api, env = k8s
    runs = Path(env["SEIS_RUNS_DIR"])
    out = subprocess.run(
        [sys.executable, "-m", "seiscli", "launch", "pretrain", "--nodes", "2", "--name", "eks-err"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ((_, name),) = api.jobs
    api.set_condition(name, "Running")
    api.start_pods(name, nodes=2, per_node=8)
    pod0, pod1 = (p["metadata"]["name"] for p in api.pods[name])
    # Rank 11 (pod 1, local rank 3) raises; rank 2 (pod 0) then loses its peer; torchrun's summary follows.
    api.logs[pod1] += (
        "[default3]:Traceback (most recent call last):\n"
        "[default3]:torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "[default3]:seis: rank 11 on ip-10-1-0-2 failed at 2026-12-02T10:05:01+00:00 (attempt 1)\n"
    )
    api.logs[pod0] += (
        "[default2]:Traceback (most recent call last):\n"
        "[default2]:torch.distributed.DistBackendError: NCCL error: remote process exited\n"
        "[default2]:seis: rank 2 on ip-10-1-0-1 failed at 2026-12-02T10:05:09+00:00 (attempt 1)\n"
    )
    errors = subprocess.run(
        [sys.executable, "-m", "seiscli", "logs", "eks-err", "--errors", "--json"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert errors.returncode == 0, errors.stderr
    (attempt,) = json.loads(errors.stdout)["attempts"]
    assert (attempt["first"]["rank"], attempt["first"]["node"]) == (11, "ip-10-1-0-2")
    assert "OutOfMemoryError" in attempt["first"]["text"]
    assert [(c["rank"], c["kind"]) for c in attempt["consequences"]] == [(2, "peer")]
    grep = subprocess.run(
        [sys.executable, "-m", "seiscli", "logs", "eks-err", "--grep", "loss 0.2 .node 1, rank 1[45]"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert [line.split()[1] for line in grep.stdout.splitlines()] == ["14", "15"]
    assert not list(runs.glob("*/*/logs/rank-*.log"))  # read through the API, not files


# -- light and quick --------------------------------------------------------------------------------------


def _finished_slurm_run(root: Path, i: int) -> Run:
    run = create_run(load_recipe("smoke", {"name": "many", "cluster.backend": "slurm"}), root)
    run.update_submission(backend="slurm", job_id=str(1000 + i), state="COMPLETED", exit_code=0)
    now = time.time()
    run.metrics_path.write_text(
        "".join(
            json.dumps({"step": s, "loss": 1.0, "step_time_s": 0.5, "data_wait_s": 0.1, "samples_per_s": 16.0,
                        "straggler_ratio": 1.1, "time": now}) + "\n"
            for s in range(1, 201)
        )
    )  # fmt: skip
    (run.path / "ranks.json").write_text(json.dumps({"nodes": ["node1", "node1", "node2", "node2"]}))
    (run.path / "rank_times.jsonl").write_text(
        "".join(json.dumps({"step": s, "step_time_s": [0.5, 0.5, 0.5, 0.9]}) + "\n" for s in range(1, 201))
    )
    (run.logs_dir / "rank-0.log").write_text("step 1/10\n" * 2000)
    (run.logs_dir / f"slurm-{1000 + i}.out").write_text("seis: job 1 on node[1-2] (restart 0)\n")
    return run


@pytest.mark.parametrize(
    "args",
    [
        ["top", "RUN", "--once"],
        ["top", "RUN", "--once", "--json"],
        ["logs", "RUN", "--errors"],
        ["logs", "RUN", "--grep", "step 1/"],
        ["status", "RUN"],
        ["status"],
    ],
)
def test_top_logs_status_with_fifty_runs_import_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    made = [_finished_slurm_run(runs, i) for i in range(50)]
    argv = [a if a != "RUN" else made[17].id for a in args]
    code = (
        f"import sys, time; t = time.perf_counter(); sys.argv = ['seis', *{argv!r}]\n"
        "from seiscli.launcher.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('\\nHEAVY', [m for m in {HEAVY!r} if m in sys.modules], round(time.perf_counter() - t, 3))"
    )
    # No Slurm tool on PATH: finished runs need none.
    env = {**os.environ, "SEIS_RUNS_DIR": str(runs), "PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    heavy = out.stdout.rsplit("\nHEAVY ", 1)[1]
    assert heavy.startswith("[]"), out.stdout + out.stderr
    if args[0] == "top" and "--json" in args:
        snap: dict[str, Any] = json.loads(out.stdout.rsplit("\nHEAVY ", 1)[0])
        assert snap["step"] == 200 and snap["slowest"][0] == {
            "rank": 3, "node": "node2", "mean_s": 0.9, "vs_median": pytest.approx(1.8)
        }  # fmt: skip
        assert [(n["node"], n["max_s"]) for n in snap["nodes"]] == [("node1", 0.5), ("node2", 0.9)]
