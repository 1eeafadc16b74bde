"""Checkpoints and resume: the manager's atomic layout, bad checkpoints, resume equivalence (DDP over 2 gloo
processes, and a real SIGKILL of a 2-process torchrun run), SIGTERM and shape-mismatch exits, `--resume`."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seiscli.checkpoint_layout import (
    LATEST,
    MANIFEST,
    find_latest,
    incompatibility,
    read_manifest,
    recipe_changes,
    step_dirs,
)
from seiscli.recipe import Recipe, RecipeError, load_recipe, validate
from seiscli.run_layout import read_attempts
from seiscli.train.checkpoint import CheckpointManager
from seiscli.train.data import build_loader
from seiscli.train.distributed import DistEnv
from seiscli.train.errors import CheckpointError
from seiscli.train.flops import recipe_flops
from seiscli.train.metrics import drop_steps_after
from seiscli.train.model import build_model, plan_for
from seiscli.train.parallel import build_engine
from seiscli.train.trainer import Trainer
from tests.distributed import run_distributed
from tests.test_train_entry import TINY


def tiny(world_size: int = 1, **over: Any) -> Recipe:
    return load_recipe(
        "smoke",
        {
            **TINY,
            "cluster.cpu_procs_per_node": world_size,
            "data.synth_shape": [16, 16, 32],
            "train.micro_batch": 2,
            "train.steps": 4,
            **over,
        },
    )


def single_env() -> DistEnv:
    return DistEnv(0, 1, 0, "test", torch.device("cpu"), cp=1)


def params(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Full parameters (an FSDP2 shard is gathered: collective there)."""
    full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in module.named_parameters()}
    return {n: p.detach().numpy().copy() for n, p in full.items()}


def train_one_step(engine: Any, recipe: Recipe, step: int) -> None:
    plan = plan_for(recipe)
    loader = [
        torch.randn(recipe.train.micro_batch, 1, *recipe.data.crop, generator=torch.Generator().manual_seed(step))
    ]
    trainer = Trainer(recipe, single_env(), engine, loader, plan, recipe_flops(recipe, plan), Path("/nonexistent"))
    trainer.train_step(iter(loader), step, _NoStop())  # type: ignore[arg-type]


class _NoStop:
    signum = None


# -- the manager ------------------------------------------------------------------------------------------


def test_save_is_atomic_keeps_k_and_moves_latest_last(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe = tiny(**{"checkpoint.keep": 2})
    env = single_env()
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    manager = CheckpointManager(recipe, env, tmp_path)
    assert manager.root == tmp_path / "checkpoints"
    for step in (1, 2, 3):
        train_one_step(engine, recipe, step)
        manager.save(step, engine, loader=None)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step-000002", "step-000003"]  # keep=2, no .tmp
    assert (root / LATEST).read_text().strip() == "step-000003"
    manifest = json.loads((root / "step-000003" / MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["world_size"] == 1 and manifest["dp_size"] == 1 and manifest["cp"] == 1
    assert manifest["strategy"] == "ddp" and manifest["model"]["encoder_dim"] == 32
    assert manifest["recipe"] == recipe.model_dump(mode="json")
    assert set(manifest["files"]) == {"engine/model_optim.pt", "trainer/rank-00000.pt"}
    for rel, size in manifest["files"].items():
        assert (root / "step-000003" / rel).stat().st_size == size
    assert find_latest(root) is not None and find_latest(root).step == 3  # type: ignore[union-attr]


def test_interval_says_when_a_save_is_due(tmp_path: Path) -> None:
    every3 = CheckpointManager(tiny(**{"checkpoint.interval": 3}), single_env(), tmp_path)
    assert [s for s in range(1, 10) if every3.due(s)] == [3, 6, 9]
    every3.last_step = 6  # just resumed from 6: not saved again
    assert not every3.due(6)
    assert not any(CheckpointManager(tiny(**{"checkpoint.interval": 0}), single_env(), tmp_path).due(s) for s in (1, 5))


def test_resume_restores_model_optimizer_rng_and_loader(tmp_path: Path, data_dir: Path) -> None:
    torch.set_num_threads(1)
    recipe = tiny()
    env = single_env()
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=env.device)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    train_one_step(engine, recipe, 0)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    CheckpointManager(recipe, env, tmp_path).save(1, engine, loader)
    expect = (random.random(), np.random.rand(), torch.rand(3), next(batches))
    saved_params = params(engine.module)
    saved_optim = engine.optimizer.state_dict()["state"]

    fresh = build_engine(build_model(recipe, env.device), recipe, env)
    fresh_loader = build_loader(recipe, dp_rank=0, dp_size=1, device=env.device)
    assert any(not np.array_equal(saved_params[n], p) for n, p in params(fresh.module).items())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert CheckpointManager(recipe, env, tmp_path).resume(fresh, fresh_loader) == 1
    got = (random.random(), np.random.rand(), torch.rand(3), next(iter(fresh_loader)))
    assert got[0] == expect[0] and got[1] == expect[1]
    assert torch.equal(got[2], expect[2]) and torch.equal(got[3], expect[3])  # the loader continues at sample 6
    assert fresh_loader.state_dict()["position"] == 4 * recipe.train.micro_batch
    for n, p in params(fresh.module).items():
        np.testing.assert_array_equal(p, saved_params[n], err_msg=n)
    for k, state in fresh.optimizer.state_dict()["state"].items():
        assert torch.equal(state["exp_avg"], saved_optim[k]["exp_avg"])


def test_no_checkpoint_starts_at_zero(tmp_path: Path) -> None:
    recipe = tiny()
    engine = build_engine(build_model(recipe, torch.device("cpu")), recipe, single_env())
    assert CheckpointManager(recipe, single_env(), tmp_path).resume(engine, None) == 0


def test_corrupt_and_partial_checkpoints_are_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    recipe = tiny(**{"checkpoint.keep": 5})
    env = single_env()
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    manager = CheckpointManager(recipe, env, tmp_path)
    at_step2: dict[str, np.ndarray] = {}
    for step in (1, 2, 3):
        train_one_step(engine, recipe, step)
        manager.save(step, engine, loader=None)
        if step == 2:
            at_step2 = params(engine.module)
    root = manager.root
    # step 3: a truncated file (a disk that filled up); step 4: no manifest; step 5: an unfinished save
    blob = root / "step-000003" / "engine" / "model_optim.pt"
    blob.write_bytes(blob.read_bytes()[:100])
    (root / "step-000004" / "engine").mkdir(parents=True)
    (root / "step-000005.tmp" / "engine").mkdir(parents=True)
    capsys.readouterr()

    fresh = build_engine(build_model(recipe, env.device), recipe, env)
    assert CheckpointManager(recipe, env, tmp_path).resume(fresh, None) == 2
    err = capsys.readouterr().err
    assert f"skipping checkpoint {root / 'step-000004'}: no manifest" in err
    assert f"skipping checkpoint {root / 'step-000003'}: engine/model_optim.pt has 100 bytes" in err
    assert "step-000005.tmp" not in err  # never a candidate
    for n, p in params(fresh.module).items():
        np.testing.assert_array_equal(p, at_step2[n], err_msg=n)
    # The next save clears the unfinished one, and keep counts only real step directories.
    CheckpointManager(recipe, env, tmp_path).save(6, fresh, loader=None)
    assert not (root / "step-000005.tmp").exists()
    assert [s for s, _ in step_dirs(root)] == [1, 2, 3, 4, 6]
    # A new save of a broken step replaces it.
    CheckpointManager(recipe, env, tmp_path).save(3, fresh, loader=None)
    assert find_latest(root).step == 6 and read_manifest(root / "step-000003")["step"] == 3  # type: ignore[union-attr]
    assert sorted(p.name for p in root.iterdir() if "tmp" in p.name) == []
    # keep counts complete checkpoints only: with keep=2, 7 and 6 stay and the broken 4 does not count.
    CheckpointManager(tiny(**{"checkpoint.keep": 2}), env, tmp_path).save(7, fresh, loader=None)
    assert [s for s, _ in step_dirs(root)] == [6, 7]


def test_another_model_shape_is_a_checkpoint_error(tmp_path: Path) -> None:
    recipe = tiny()
    env = single_env()
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    CheckpointManager(recipe, env, tmp_path).save(1, engine, loader=None)
    wider = tiny(**{"model.encoder_dim": 64})
    other = build_engine(build_model(wider, env.device), wider, env)
    with pytest.raises(CheckpointError, match=r"model.encoder_dim=32 there, 64 here"):
        CheckpointManager(wider, env, tmp_path).resume(other, None)
    # An attention kernel is not a shape: it may change on resume.
    flash = tiny(**{"model.attention": "math"})
    assert CheckpointManager(flash, env, tmp_path).resume(
        build_engine(build_model(flash, env.device), flash, env), None
    )


def test_strategy_and_world_size_rules() -> None:
    recipe = tiny(2)
    manifest = {"model": {k: v for k, v in recipe.model.model_dump(mode="json").items() if k != "attention"}}
    assert incompatibility(manifest | {"strategy": "ddp", "world_size": 2}, recipe) is None
    assert "parallelism.strategy='zero3'" in incompatibility(manifest | {"strategy": "zero3", "world_size": 2}, recipe)  # type: ignore[operator]
    other_world = manifest | {"strategy": "ddp", "world_size": 4}
    assert incompatibility(other_world, recipe, reshardable=True) is None
    assert "cannot reshard" in incompatibility(other_world, recipe, reshardable=False)  # type: ignore[operator]


def test_recipe_changes_name_training_fields_only() -> None:
    saved = tiny(**{"train.steps": 6, "data.workers": 0, "optim.lr": 1e-3})
    manifest = {"recipe": saved.model_dump(mode="json")}
    assert recipe_changes(manifest, saved) == []
    assert recipe_changes({}, saved) == []  # a manifest written before recipes were kept in it
    # loader and device knobs change speed, not what is trained
    assert recipe_changes(manifest, tiny(**{"train.steps": 6, "data.workers": 3, "optim.lr": 1e-3})) == []
    later = tiny(**{"train.steps": 9, "data.workers": 0, "optim.lr": 5e-4, "data.crop": [16, 16, 8]})
    assert recipe_changes(manifest, later) == [
        f"data.crop {list(saved.data.crop)!r} -> [16, 16, 8]",
        "optim.lr 0.001 -> 0.0005",
        "train.steps 6 -> 9",
    ]


def test_object_store_checkpoint_dir_is_refused_with_the_field(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"checkpoint.dir.*'s3://bucket/ckpt'.*allowed: a path"):
        tiny(**{"checkpoint.dir": "s3://bucket/ckpt"})
    out = subprocess.run(
        [sys.executable, "-m", "seiscli", "launch", "smoke", "--dry-run", "--set", "checkpoint.dir=s3://b/x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "checkpoint.dir" in out.stderr and "s3://" in out.stderr


def test_metrics_past_the_checkpoint_are_dropped_on_resume(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 6, "lo')  # killed mid-line
    drop_steps_after(tmp_path, 3)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"


def test_usr1_during_start_up_is_kept_and_outranks_a_later_sigterm() -> None:
    from seiscli.train.signals import StopRequest, catch_early_usr1

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        catch_early_usr1()
        os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning while the model is still being built
        with StopRequest() as stop:
            assert stop.signum == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGTERM)  # the time limit after the warning: the requeue still wins
            assert stop.signum == signal.SIGUSR1
        with StopRequest() as stop:
            assert stop.signum is None  # taken once
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_summary_keeps_the_worst_straggler_after_the_warm_up(tmp_path: Path) -> None:
    from seiscli.train.metrics import MetricsLog

    log = MetricsLog(None, skip=1)
    for step, ratio in enumerate([5.0, 1.2, 1.9, 1.1], start=1):
        log.log({"step": step, "loss": 1.0, "step_time_s": 1.0, "data_wait_s": 0.0, "straggler_ratio": ratio})
    summary = log.summary()
    assert summary["straggler_ratio_max"] == 1.9 and summary["straggler_step"] == 3


# -- resume equivalence: DDP over two gloo processes -----------------------------------------------------------


class SignalAfter:
    """The real loader, with SIGTERM raised on rank 0 while it hands out batch `n` (as a scheduler would)."""

    def __init__(self, loader: Any, n: int, rank: int) -> None:
        self.loader, self.n, self.rank = loader, n, rank

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(self.loader):
            if i == self.n and self.rank == 0:
                signal.raise_signal(signal.SIGTERM)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def train_run(rank: int, world_size: int, recipe_data: dict, run_dir: str, stop_at_batch: int | None) -> Any:
    recipe = validate(recipe_data)
    Path(run_dir).mkdir(exist_ok=True)
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=1)
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    loader: Any = build_loader(recipe, dp_rank=rank, dp_size=world_size, device=env.device)
    if stop_at_batch is not None:
        loader = SignalAfter(loader, stop_at_batch, rank)
    manager = CheckpointManager(recipe, env, Path(run_dir))
    start = manager.resume(engine, loader)
    plan = plan_for(recipe)
    result = Trainer(recipe, env, engine, loader, plan, recipe_flops(recipe, plan), Path(run_dir), manager).run(start)
    full = params(engine.module)
    if rank == 0:
        np.savez(Path(run_dir) / "params.npz", **full)
    return start, result.signal, result.steps


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero2", "fsdp2"])
def test_stop_and_resume_equals_an_uninterrupted_run(strategy: str, tmp_path: Path, data_dir: Path) -> None:
    recipe = tiny(2, **{"train.steps": 4, "train.grad_accum": 2, "parallelism.strategy": strategy})
    recipe = recipe.model_dump(mode="json")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_distributed(train_run, 2, recipe, str(straight), None) == (0, None, 4)
    # SIGTERM during step 2 (batches 2-3 of 2 micro-batches a step): stops after step 2 with a checkpoint.
    assert run_distributed(train_run, 2, recipe, str(split), 2) == (0, signal.SIGTERM, 2)
    assert (split / "checkpoints" / LATEST).read_text().strip() == "step-000002"
    assert run_distributed(train_run, 2, recipe, str(split), None) == (2, None, 2)
    assert _losses(split) == _losses(straight) and [s for s, _ in _losses(split)] == [1, 2, 3, 4]
    a, b = np.load(straight / "params.npz"), np.load(split / "params.npz")
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    record = json.loads((split / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step_time_max_s"] > 0 and record["straggler_ratio"] >= 1.0
    summary = json.loads((split / "summary.json").read_text())
    assert summary["start_step"] == 2 and summary["straggler_ratio_max"] >= 1.0

    if strategy != "ddp":
        return
    # DDP checkpoints are full replicas (reshardable): one process resumes the 2-process checkpoint of step 2,
    # with its data stream at the same position (2 steps x 2 micro-batches x 2 samples).
    one = tmp_path / "one" / "checkpoints"
    one.mkdir(parents=True)
    shutil.copytree(split / "checkpoints" / "step-000002", one / "step-000002")
    recipe1 = tiny(1, **{"train.steps": 4, "train.grad_accum": 2})
    env = single_env()
    engine = build_engine(build_model(recipe1, env.device), recipe1, env)
    loader = build_loader(recipe1, dp_rank=0, dp_size=1, device=env.device)
    assert CheckpointManager(recipe1, env, tmp_path / "one").resume(engine, loader) == 2
    assert loader.state_dict()["position"] == 8
    saved = torch.load(one / "step-000002" / "engine" / "model_optim.pt", weights_only=True)["model"]
    assert all(torch.equal(p, saved[n]) for n, p in engine.module.state_dict().items())


# -- real processes ----------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, recipe: Recipe) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    return path


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID")}


def _torchrun(recipe_path: Path, run_dir: Path, nproc: int) -> list[str]:
    # what the local backend's launch.sh runs
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "seiscli.train", str(recipe_path), "--run-dir", str(run_dir)]  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
        except OSError:
            continue
    return kids


@pytest.mark.slow
def test_sigkill_then_relaunch_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, data_dir: Path) -> None:
    recipe = load_recipe("smoke", {"train.steps": 80, "checkpoint.interval": 10, "checkpoint.keep": 2})
    path = _write(tmp_path, "smoke", recipe)
    ref = subprocess.run(_torchrun(path, tmp_path / "ref", 2), env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_torchrun(path, run_dir, 2), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        _wait_for(run_dir / "checkpoints" / "step-000020", proc)
        # Both ranks and torchrun, with no chance to clean up (torchrun's workers have sessions of their own).
        ranks = _children(proc.pid)
        assert len(ranks) == 2, ranks
        for pid in [*ranks, proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    killed_at = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert killed_at < recipe.train.steps, "the run finished before it was killed"
    saved = find_latest(run_dir / "checkpoints")
    assert saved is not None and 20 <= saved.step < recipe.train.steps

    again = subprocess.run(_torchrun(path, run_dir, 2), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {saved.path} at step {saved.step}" in again.stdout
    resumed, reference = _losses(run_dir), _losses(tmp_path / "ref")
    assert [s for s, _ in resumed] == list(range(1, recipe.train.steps + 1))
    assert resumed == reference  # step for step, bit for bit (same processes, threads and data)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["start_step"] == saved.step
    assert summary["steps"] == recipe.train.steps - saved.step
    assert find_latest(run_dir / "checkpoints").step == recipe.train.steps  # type: ignore[union-attr]


@pytest.mark.slow
def test_sigterm_checkpoints_then_exits_143(tmp_path: Path, data_dir: Path) -> None:
    recipe = load_recipe("smoke", {"train.steps": 100_000, "cluster.cpu_procs_per_node": 1})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "seiscli.train", str(_write(tmp_path, "long", recipe)), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(run_dir / "metrics.jsonl", proc)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    found = find_latest(run_dir / "checkpoints")
    assert found is not None and found.step == summary["steps"] >= 1
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == found.path.name
    assert f"checkpoint {found.path}" in out


@pytest.mark.slow
def test_resuming_another_model_shape_exits_2_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    small = load_recipe("smoke", {"train.steps": 2, "cluster.cpu_procs_per_node": 1})
    cmd = [sys.executable, "-m", "seiscli.train", str(_write(tmp_path, "a", small)), "--run-dir", str(run_dir)]
    assert subprocess.run(cmd, env=_env(), capture_output=True, timeout=300).returncode == 0
    wide = load_recipe("smoke", {"train.steps": 4, "cluster.cpu_procs_per_node": 1, "model.encoder_dim": 128})
    cmd = [sys.executable, "-m", "seiscli.train", str(_write(tmp_path, "b", wide)), "--run-dir", str(run_dir)]
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "cannot resume from" in errors[0] and "model.encoder_dim=96 there, 128 here" in errors[0]


# -- seis launch --resume (local backend) ---------------------------------------------------------------------


def seis(runs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args, "--runs-dir", str(runs)],
        env=_env(),
        cwd=runs.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_launch_resume_refuses_unknown_runs_and_runs_without_checkpoints(tmp_path: Path) -> None:
    from seiscli.launcher.runs import create_run

    runs = tmp_path / "runs"
    out = seis(runs, "launch", "smoke", "--resume", "nope", "--dry-run")
    assert out.returncode == 2 and "--resume nope: no run 'nope'" in out.stderr
    run = create_run(load_recipe("smoke"), runs)
    out = seis(runs, "launch", "smoke", "--resume", run.id, "--dry-run")
    assert out.returncode == 2 and "has no complete checkpoint" in out.stderr


@pytest.mark.slow
def test_launch_resume_continues_a_local_run_from_its_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    from seiscli.launcher.runs import iter_runs

    runs = tmp_path / "runs"
    first = seis(runs, "launch", "smoke", "--steps", "6", "--name", "first")
    assert first.returncode == 0, first.stdout + first.stderr
    (old,) = iter_runs(runs)
    ckpt = old.path / "checkpoints"
    assert find_latest(ckpt).step == 6  # type: ignore[union-attr]
    # another model cannot resume it, before anything is submitted
    bad = seis(runs, "launch", "smoke", "--steps", "9", "--resume", old.id, "--set", "model.encoder_dim=128")
    assert bad.returncode == 2 and "model.encoder_dim=96 there, 128 here" in bad.stderr
    second = seis(runs, "launch", "smoke", "--steps", "9", "--name", "second", "--resume", old.id)
    assert second.returncode == 0, second.stdout + second.stderr
    new = next(r for r in iter_runs(runs) if r.name == "second")
    sub = new.submission()
    assert sub["resumed_from"] == old.id and sub["resume_step"] == 6
    assert sub["resume_checkpoint"] == str(ckpt / "step-000006")
    assert load_recipe(str(new.recipe_path)).checkpoint.dir == str(ckpt)
    assert [s for s, _ in _losses(new.path)] == [7, 8, 9]
    assert new.summary()["start_step"] == 6 and new.summary()["status"] == "completed"
    assert find_latest(ckpt).step == 9  # type: ignore[union-attr]
    # Lengthening a run reshapes its learning-rate schedule from the resumed step on: said before submitting,
    # by the trainer with the jump, and in the attempt ledger (`seis status`).
    assert "the recipe differs from the one that saved it; from there on: train.steps 6 -> 9" in " ".join(
        second.stderr.split()
    )
    job_out = (new.logs_dir / "job.out").read_text()
    assert re.search(r"the new values apply from here on: train.steps 6 -> 9 \(learning rate \S+ at the last step "
                     r"saved, \S+ at the next one\)", job_out), job_out  # fmt: skip
    assert read_attempts(new.path)[0]["recipe_changes"] == ["train.steps 6 -> 9"]
    assert "with recipe changes: train.steps 6 -> 9" in " ".join(seis(runs, "status", new.id).stdout.split())


# -- Slurm: USR1 before the time limit -> checkpoint, requeue, resume --------------------------------------


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_usr1_warning_checkpoints_requeues_and_the_next_attempt_resumes(tmp_path: Path, data_dir: Path) -> None:
    from seiscli.launcher.backends.base import JobState
    from seiscli.launcher.backends.slurm import run_slurm
    from seiscli.launcher.runs import iter_runs
    from tests.test_slurm import release_requeued, wait_for

    runs = tmp_path / "runs"
    # A 3-minute limit with the warning 150 s before it. Slurm may send USR1 up to a minute early, so it often
    # comes while the trainer is still starting: the trainer keeps it and acts after its first step.
    limits = ["--set", "cluster.time_limit=00:03:00", "--set", "cluster.signal_seconds=150"]
    out = seis(runs, "launch", "smoke", "--backend", "slurm", "--steps", "100000", *limits)
    assert out.returncode == 0, out.stdout + out.stderr
    (run,) = iter_runs(runs)
    job_id = run.submission()["job_id"]
    try:
        wait_for(run, {JobState.REQUEUED}, 240)
        summary = run.summary()
        assert summary["status"] == "stopped" and summary["signal"] == signal.SIGUSR1 and summary["requeued"] is True
        saved = find_latest(run.path / "checkpoints")
        assert saved is not None and saved.step == summary["steps"]
        first = (run.logs_dir / "rank-0.log").read_text()
        assert f"checkpoint {saved.path}" in first and f"job {job_id} requeued" in first
        # Released once it is back to PENDING (and not within the second of its requeue: release_requeued).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            steps = [s for s, _ in _losses(run.path)] if run.metrics_path.exists() else []
            if steps and steps[-1] > saved.step:
                break
            if run_slurm(["squeue", "-h", "-j", str(job_id), "-o", "%T"]).out.strip() == "PENDING":
                release_requeued(str(job_id))
            time.sleep(2)
        log = (run.logs_dir / "rank-0.log").read_text()
        assert f"resumed from {saved.path} at step {saved.step}" in log
        steps = [s for s, _ in _losses(run.path)]
        assert steps[: saved.step + 1] == list(range(1, saved.step + 2))  # one line per step across attempts
    finally:
        run_slurm(["scancel", str(job_id)])


# -- fallback to an older checkpoint, fsync, bounded saves (issue 11, item 3) ----------------------------------


class HangingState:
    """The real loader, except that rank `rank`'s state_dict never returns: a rank hung in the middle of a save."""

    def __init__(self, loader: Any, rank: int, hang_on: int) -> None:
        self.loader, self.hang = loader, rank == hang_on

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.loader)

    def state_dict(self) -> dict[str, Any]:
        if self.hang:
            time.sleep(3600)
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def fallback_run(rank: int, world_size: int, recipe_data: dict, run_dir: str, hang_on: int = -1) -> dict[str, Any]:
    """Resume (falling back as needed) and train; every rank's start step and the files it fsynced."""
    import torch.distributed as dist

    recipe = validate(recipe_data)
    Path(run_dir).mkdir(exist_ok=True)
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=1)
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    loader = HangingState(build_loader(recipe, dp_rank=rank, dp_size=world_size, device=env.device), rank, hang_on)
    manager = CheckpointManager(recipe, env, Path(run_dir))
    start = manager.resume(engine, loader)
    plan = plan_for(recipe)
    Trainer(recipe, env, engine, loader, plan, recipe_flops(recipe, plan), Path(run_dir), manager).run(start)
    starts: list[Any] = [None] * world_size
    synced: list[Any] = [None] * world_size
    dist.all_gather_object(starts, start)
    dist.all_gather_object(synced, [str(p) for p in getattr(manager, "synced", [])])
    return {"starts": starts, "synced": synced}


def _unloadable(path: Path) -> None:
    """Same size, bytes no loader accepts (a torn write or a bad disk block)."""
    path.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(path.stat().st_size)))


@pytest.mark.slow
def test_an_unloadable_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    over = {"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3}
    first = run_distributed(fallback_run, 2, tiny(2, **over).model_dump(mode="json"), str(tmp_path))
    root = tmp_path / "checkpoints"
    assert first["starts"] == [0, 0]
    # Every file the manifest lists was fsynced (by one process per node) before the manifest was written.
    listed = {str(root / "step-000004.tmp" / rel) for rel in read_manifest(root / "step-000004")["files"]}
    assert listed <= {p for files in first["synced"] for p in files}
    before = _losses(tmp_path)
    _unloadable(root / "step-000004" / "engine" / "model_optim.pt")
    assert read_manifest(root / "step-000004")  # sizes match: only loading it can tell
    capfd.readouterr()

    again = run_distributed(fallback_run, 2, tiny(2, **over).model_dump(mode="json"), str(tmp_path))
    assert again["starts"] == [2, 2]
    err = capfd.readouterr().err
    assert f"checkpoint {root / 'step-000004'} (step 4) could not be loaded on 2 rank(s)" in err, err
    assert "renamed to step-000004.bad; trying the previous complete checkpoint" in err
    assert (root / "step-000004.bad").is_dir() and find_latest(root).step == 4  # type: ignore[union-attr]
    assert _losses(tmp_path) == before  # steps 3-4 redone from step 2, exactly


@pytest.mark.slow
def test_all_ranks_fall_back_together_when_one_rank_cannot_load(tmp_path: Path, data_dir: Path) -> None:
    over = {"train.steps": 4, "checkpoint.interval": 2, "checkpoint.keep": 3}
    run_distributed(fallback_run, 2, tiny(2, **over).model_dump(mode="json"), str(tmp_path))
    root = tmp_path / "checkpoints"
    _unloadable(root / "step-000004" / "trainer" / "rank-00001.pt")  # rank 0 alone would load step 4
    again = run_distributed(fallback_run, 2, tiny(2, **over).model_dump(mode="json"), str(tmp_path))
    assert again["starts"] == [2, 2]


def test_exit_2_only_when_no_checkpoint_loads(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe, env = tiny(), single_env()
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    manager = CheckpointManager(recipe, env, tmp_path)
    for step in (1, 2):
        train_one_step(engine, recipe, step)
        manager.save(step, engine, loader=None)
    for step in (1, 2):
        _unloadable(manager.root / f"step-00000{step}" / "engine" / "model_optim.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* could be loaded \(renamed: step-000002.bad, "):
        CheckpointManager(recipe, env, tmp_path).resume(engine, None)


def test_an_early_started_loader_follows_resume_back_to_the_previous_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    """start_loader positions and starts the loader at the checkpoint resume() tries first; when that one does
    not load, resume() falls back and the loader is re-positioned at the older one (workers restarted there)."""
    from seiscli.train.entry import start_loader

    torch.set_num_threads(1)
    recipe, env = tiny(**{"data.workers": 1}), single_env()
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    manager = CheckpointManager(recipe, env, tmp_path)
    saver = build_loader(recipe, dp_rank=0, dp_size=1, device=env.device)
    mb = recipe.train.micro_batch
    for step in (2, 4):
        train_one_step(engine, recipe, step)
        saver.load_state_dict(saver.state_dict() | {"position": step * mb})
        manager.save(step, engine, saver)
    _unloadable(manager.root / "step-000004" / "engine" / "model_optim.pt")

    loader, checkpoints = start_loader(recipe, env, tmp_path)
    assert loader.position == 4 * mb and loader._pump is not None  # started at the newest checkpoint
    assert checkpoints.resume(engine, loader) == 2
    assert loader.position == 2 * mb
    assert torch.equal(next(iter(loader)), saver.dataset[2 * mb][0])
    loader.close()
    sweep_loader, none = start_loader(recipe, env, tmp_path, sweep=True)  # a sweep run: no manager
    assert none is None and sweep_loader.position == 0 and sweep_loader._pump is not None
    sweep_loader.close()
    saver.close()


@pytest.mark.slow
def test_a_rank_hung_in_a_save_stops_the_job_within_the_save_timeout(
    tmp_path: Path, data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    over = {"train.steps": 4, "checkpoint.interval": 2, "checkpoint.save_timeout_s": 10}
    with pytest.raises(AssertionError) as failed:  # well before the harness's own timeout, let alone 30 minutes
        run_distributed(fallback_run, 2, tiny(2, **over).model_dump(mode="json"), str(tmp_path), 1, timeout=240)
    assert "exit code 1" in str(failed.value), str(failed.value)
    err = capfd.readouterr().err
    assert "checkpoint save of step 2 on rank " in err and "checkpoint.save_timeout_s=10s" in err, err
    assert not (tmp_path / "checkpoints" / "step-000002").exists()  # never committed
