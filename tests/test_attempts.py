"""Provenance, the attempt ledger, the job script's retry policy by exit code, and `seis rerun` (issue 14, items
1, 2, 3 and 6). The Slurm tests run the real trainer (smoke recipe, 4 steps) through the rendered job script;
failures are made with real components (a gloo peer gone, a SIGKILLed rank or loader worker, a recipe the
trainer rejects) through the SEIS_FAULT test hook where a real fault cannot be had on demand."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from seiscli.launcher.backends.base import JobState
from seiscli.launcher.backends.slurm import run_slurm
from seiscli.launcher.provenance import git_state, write_launch_provenance
from seiscli.launcher.runs import Run
from seiscli.recipe import PROJECT_ROOT, load_recipe
from seiscli.run_layout import EXIT_COMM, EXIT_FAILED, EXIT_LOADER, append_event, read_attempts, retry_reason
from seiscli.train.provenance import classify_exit
from tests.test_slurm import release_requeued, seis, status_json, wait_for

STEPS = "4"
FINISHED = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT, JobState.OUT_OF_MEMORY}


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def test_patch_of_a_dirty_tree_gives_back_the_code(tmp_path: Path) -> None:
    repo = tmp_path / "code"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("*.log\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    (repo / "a.py").write_text("x = 2\n")
    (repo / "new.py").write_text("y = 3\n")
    (repo / "noise.log").write_text("ignored\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = write_launch_provenance(run_dir, load_recipe("smoke"), root=repo)
    assert data["git"]["commit"] == _git(repo, "rev-parse", "HEAD").strip() and data["git"]["dirty"]
    # The commit plus the patch is the code that ran: apply it to a clean clone.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    _git(clone, "apply", str(run_dir / "provenance" / "git.patch"))
    assert (clone / "a.py").read_text() == "x = 2\n" and (clone / "new.py").read_text() == "y = 3\n"
    assert not (clone / "noise.log").exists()
    _git(repo, "checkout", "-q", "a.py")
    (repo / "new.py").unlink()
    assert git_state(repo)["dirty"] is False


def test_ledger_lines_merge_into_attempts(tmp_path: Path) -> None:
    for ev in (
        {"event": "start", "attempt": 1, "job_id": "7", "restart_count": 0, "nodes": ["n1"], "time": 10.0},
        {"event": "trainer", "attempt": 1, "first_step": 1, "resumed_from": None, "time": 11.0},
        {"event": "rank_exit", "attempt": 1, "time": 13.0, "rank": 0, "exit_code": 3, "host": "n1"},
        {"event": "rank_exit", "attempt": 1, "time": 12.0, "rank": 1, "exit_code": 3, "host": "n1"},
        {"event": "end", "attempt": 1, "time": 14.0, "exit_code": 3, "last_step": 5, "action": "requeue"},
        {"event": "start", "attempt": 2, "job_id": "7", "restart_count": 1, "nodes": ["n2"], "time": 20.0},
        {"event": "trainer", "attempt": 2, "first_step": 6, "resumed_from": "/c/step-000005", "time": 21.0},
        {"event": "trainer", "attempt": 2, "first_step": 6, "resumed_from": "/c/step-000005", "time": 25.0},
    ):
        append_event(tmp_path, ev)
    with (tmp_path / "attempts.jsonl").open("a") as f:
        f.write('{"event": "end", "attem')  # a line cut by a killed writer
    one, two = read_attempts(tmp_path)
    assert (one["exit_code"], one["action"], one["first_step"], one["last_step"]) == (3, "requeue", 1, 5)
    assert [r["rank"] for r in one["failed_ranks"]] == [1, 0]  # earliest first: rank 1 was the cause
    assert (two["restart_count"], two["nodes"], two["resumed_from"]) == (1, ["n2"], "/c/step-000005")
    assert two["end_time"] is None and two["step_restarts"] == 1
    # Readers fill an end the job script could not write: from the scheduler's record of that attempt, or
    # (no job script: local runs) from the run's final state.
    from seiscli.launcher.runinfo import attempts

    run = Run(tmp_path)
    sched = [{"state": "REQUEUED"}, {"state": "NODE_FAIL", "end_time": 30.0, "exit_code": 0, "source": "sacct"}]
    assert attempts(run, sched)[1]["action"] == "NODE_FAIL" and attempts(run, sched)[1]["end_time"] == 30.0
    (tmp_path / "metrics.jsonl").write_text('{"step": 9}\n')
    done = attempts(run, None, {"state": "COMPLETED", "exit_code": 0})[1]
    assert (done["action"], done["exit_code"], done["last_step"]) == ("COMPLETED", 0, 9)
    assert attempts(run, None, {"state": "RUNNING"})[1]["action"] is None


def test_retry_reason_follows_the_readme_table() -> None:
    assert retry_reason(0) is None and retry_reason(1) is None and retry_reason(2) is None
    assert retry_reason(EXIT_COMM) and retry_reason(EXIT_LOADER)
    assert "signal 9" in (retry_reason(137) or "") and "signal 15" in (retry_reason(143) or "")
    assert retry_reason(5) is None and retry_reason(255) is None


class _Slow:
    """A dataset whose worker takes long enough per item to be killed mid-epoch."""

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> Any:
        import torch

        if i >= 4:
            time.sleep(0.2)
        return torch.full((256, 256), float(i))


class _Bad:
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> Any:
        raise ValueError(f"bad sample {i}")


def _failure(run: Any) -> BaseException:
    try:
        run()
    except Exception as e:
        return e
    raise AssertionError("no exception")


def test_exceptions_map_to_exit_codes() -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    assert classify_exit(dist.DistNetworkError("peer gone")) == EXIT_COMM
    assert classify_exit(RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer")) == EXIT_COMM
    assert classify_exit(ValueError("model.foo")) == EXIT_FAILED

    def kill_worker() -> None:
        it = iter(DataLoader(_Slow(), batch_size=2, num_workers=1, prefetch_factor=2))
        next(it)
        for w in it._workers:  # type: ignore[attr-defined]
            os.kill(w.pid, signal.SIGKILL)  # as the OOM killer does
        try:
            for _ in range(100):
                next(it)
        finally:
            # torch's SIGCHLD handler would otherwise raise about the dead worker later, wherever the test is.
            it._shutdown_workers()  # type: ignore[attr-defined]

    assert classify_exit(_failure(kill_worker)) == EXIT_LOADER
    # An exception raised inside a worker (bad data) is not a killed worker: a restart would meet it again.
    assert classify_exit(_failure(lambda: next(iter(DataLoader(_Bad(), num_workers=1))))) == EXIT_FAILED


def test_a_killed_worker_of_the_trainers_loader_surfaces_at_the_next_batch_only(data_dir: Path) -> None:
    """The trainer's loader workers are forkserver children, not the trainer's: torch's SIGCHLD handler, which
    raises about a dead fork-started worker at whatever line runs next (also inside the failure reporting),
    never fires in the trainer. The death surfaces where the trainer asks for a batch, and maps to EXIT_LOADER."""
    import torch

    from seiscli.recipe import validate
    from seiscli.train.data import build_loader

    data = {"source": "synthetic", "synth_shape": [40, 40, 48], "crop": [16, 16, 32], "workers": 2, "prefetch": 1}
    recipe = validate({"name": "t", "model": {"patch_size": 8}, "data": data, "train": {"micro_batch": 2}})
    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    try:
        batches = iter(loader)
        next(batches)
        workers = loader._workers_iter._workers  # type: ignore[union-attr]
        assert all(w.pid not in _children() for w in workers)  # what keeps SIGCHLD away from the trainer
        os.kill(workers[0].pid, signal.SIGKILL)  # as the OOM killer does
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # other work while the death is known: nothing is raised here
            sum(range(1000))
        failure = _failure(lambda: [next(batches) for _ in range(100)])
        assert classify_exit(failure) == EXIT_LOADER, failure
    finally:
        loader.close()


def _children() -> set[int]:
    me = os.getpid()
    return {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == me}


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# -- real Slurm jobs ---------------------------------------------------------------------------------------


def _launch(runs: Path, name: str, *args: str, fault: str | None = None, steps: str = STEPS) -> Run:
    env = {"SEIS_FAULT": fault} if fault else {}
    out = seis("launch", "smoke", "--backend", "slurm", "--steps", steps, "--name", name, *args, runs=runs, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = runs.glob(f"{name}/*/submission.json")
    return Run(path.parent)


def _sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _release_when_requeued(run: Run, timeout: float = 300) -> None:
    wait_for(run, {JobState.REQUEUED}, timeout)
    release_requeued(run.submission()["job_id"])


@pytest.mark.slurm
@pytest.mark.slow
def test_retry_policy_by_exit_code_on_real_jobs(tmp_path: Path) -> None:
    """Five jobs at once: a communication failure is requeued and the next attempt resumes from the checkpoint;
    a killed loader worker and a SIGKILLed rank are retryable but cluster.max_retries=0 stops them; a recipe
    the trainer rejects (exit 2) is never retried; Slurm's USR1 warning makes the trainer requeue itself, which
    the ledger records as such (not a failure)."""
    runs = tmp_path / "runs"
    jobs: list[Run] = []

    def launch(name: str, *args: str, fault: str | None = None, steps: str = STEPS) -> Run:
        jobs.append(_launch(runs, name, *args, fault=fault, steps=steps))
        return jobs[-1]

    try:
        comm = launch("f-comm", *_sets("checkpoint.interval=1", "cluster.max_retries=2"), fault="comm@2")
        # The loader keeps workers x prefetch batches in flight plus one being copied ahead: the killed worker
        # is noticed only when a later batch is needed, so this run has steps beyond those.
        loader = launch("f-loader", *_sets("data.workers=1", "cluster.max_retries=0"), fault="loader@2", steps="10")
        kill = launch("f-kill", *_sets("cluster.max_retries=0"), fault="kill@2")
        config = launch("f-config", *_sets("model.attention=cudnn"))  # a valid recipe the CPU trainer refuses
        # Slurm's USR1 warning 90 s before a two-minute limit (30 s in, after the imports even on a loaded machine):
        # the trainer checkpoints and requeues itself.
        usr1 = launch("usr1", "--steps", "100000", *_sets('cluster.time_limit="2"', "cluster.signal_seconds=90"))
        _release_when_requeued(comm)
        _release_when_requeued(usr1)
        for run in (comm, loader, kill, config):
            wait_for(run, FINISHED, 400)
        deadline = time.monotonic() + 300
        while len(read_attempts(usr1.path)) < 2 or read_attempts(usr1.path)[1]["first_step"] is None:
            assert time.monotonic() < deadline, read_attempts(usr1.path)
            time.sleep(2)
        run_slurm(["scancel", str(usr1.submission()["job_id"])])
        first, second = read_attempts(usr1.path)[:2]
        assert (first["exit_code"], first["action"], first["retries"]) == (0, "requeued", 0)
        assert second["restart_count"] == 1 and second["resumed_from"].endswith(f"step-{first['last_step']:06d}")
        assert second["recipe_changes"] == []  # a requeue resumes with the recipe that saved the checkpoint

        first, second = read_attempts(comm.path)
        assert (first["exit_code"], first["action"], first["last_step"]) == (EXIT_COMM, "requeue", 2)
        assert first["failed_ranks"][0]["rank"] == 1  # the rank that failed first, not its peer
        assert second["restart_count"] == 1 and second["resumed_from"].endswith("step-000001")
        assert (second["first_step"], second["last_step"], second["action"]) == (2, int(STEPS), "done")
        row = status_json(runs, comm.id)
        assert row["state"] == "COMPLETED" and [a["attempt"] for a in row["attempts"]] == [1, 2]
        assert "requeue" in seis("status", comm.id, runs=runs).stdout

        (a,) = read_attempts(loader.path)
        assert (a["exit_code"], a["action"]) == (EXIT_LOADER, "stop") and "max_retries=0 reached" in a["why"]
        (a,) = read_attempts(kill.path)
        # The killed rank records nothing and its peer fails with a broken connection (3): srun's report of the
        # killed task makes the signal the cause.
        assert (a["exit_code"], a["action"]) == (128 + signal.SIGKILL, "stop") and "signal 9" in a["why"]
        assert [r["exit_code"] for r in a["failed_ranks"]] in ([EXIT_COMM], [])  # rank 0 only followed it
        (a,) = read_attempts(config.path)
        assert (a["exit_code"], a["action"], a["why"]) == (2, "stop", "configuration error")
        row = status_json(runs, config.id)
        assert row["state"] == "FAILED" and row["restarts"] == 0
    finally:
        for run in jobs:
            run_slurm(["scancel", str(run.submission().get("job_id"))])


@pytest.mark.slurm
@pytest.mark.slow
def test_provenance_ledger_show_and_rerun_of_a_completed_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run = _launch(runs, "prov")
    reruns: list[Run] = []
    try:
        wait_for(run, FINISHED, 400)
        assert run.submission()["state"] == "COMPLETED"
        launch = json.loads((run.path / "provenance" / "launch.json").read_text())
        head = _git(PROJECT_ROOT, "rev-parse", "HEAD").strip()
        dirty = bool(_git(PROJECT_ROOT, "status", "--porcelain", "--untracked-files=normal").strip())
        assert launch["git"]["commit"] == head and launch["git"]["dirty"] == dirty
        assert (run.path / "provenance" / "git.patch").is_file() == dirty
        env = json.loads((run.path / "provenance" / "attempt-1.json").read_text())
        import torch

        assert env["torch"] == torch.__version__ and "torch" in env["packages"] and env["python"]
        (attempt,) = read_attempts(run.path)
        assert env["nodes"] == attempt["nodes"] and env["nodes"][0] in ("node1", "node2")
        assert (attempt["exit_code"], attempt["action"], attempt["first_step"], attempt["last_step"]) == (
            0,
            "done",
            1,
            int(STEPS),
        )
        assert attempt["job_id"] == run.submission()["job_id"] and attempt["restart_count"] == 0

        shown = json.loads(seis("show", run.id, "--json", runs=runs).stdout)
        assert shown["launch"]["git"]["commit"] == head and shown["environment"]["1"]["torch"] == torch.__version__
        text = seis("show", run.id, runs=runs).stdout
        assert head[:12] in text and torch.__version__ in text and "done" in text
        row = status_json(runs, run.id)
        assert row["attempts"][0]["exit_code"] == 0 and head[:12] in row["code"]

        # Again as it was (its recorded script, pointed at a new run directory), and with an override.
        same = seis("rerun", run.id, runs=runs)
        assert same.returncode == 0, same.stdout + same.stderr
        changed = seis("rerun", run.id, "--set", "train.steps=2", runs=runs)
        assert changed.returncode == 0, changed.stdout + changed.stderr
        reruns = sorted((Run(p.parent) for p in runs.glob("prov/*/submission.json") if p.parent != run.path), key=str)
        assert len(reruns) == 2 and all(r.submission()["rerun_of"] == run.id for r in reruns)
        again, fewer = sorted(reruns, key=lambda r: r.submission()["rerun_script_reused"], reverse=True)
        old_script = (run.path / "job.sbatch").read_text()
        assert (again.path / "job.sbatch").read_text() == old_script.replace(str(run.path), str(again.path))
        for r in reruns:
            wait_for(r, FINISHED, 400)
            assert r.submission()["state"] == "COMPLETED"
        assert read_attempts(again.path)[0]["last_step"] == int(STEPS)
        assert read_attempts(fewer.path)[0]["last_step"] == 2
        assert status_json(runs, fewer.id)["rerun_of"] == run.id
        bad = seis("rerun", run.id, "--set", "train.stepz=2", runs=runs)
        assert bad.returncode == 2 and "train.stepz" in bad.stderr
        assert len(list(runs.glob("prov/*/submission.json"))) == 3  # nothing written for the bad one
    finally:
        for r in (run, *reruns):
            run_slurm(["scancel", str(r.submission().get("job_id"))])
