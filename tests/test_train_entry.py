"""The trainer entry point: launch environment, optimiser, engine choice, DDP against one process, and real
`torchrun -m seiscli.train` runs of the smoke recipe on CPU (gloo), including a clean stop on SIGTERM."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seiscli.recipe import STRATEGIES, Recipe, RecipeError, load_recipe, validate
from seiscli.train import distributed
from seiscli.train.distributed import DistEnv, read_proc_env
from seiscli.train.entry import main
from seiscli.train.errors import LaunchError
from seiscli.train.flops import recipe_flops
from seiscli.train.metrics import MetricsLog, excluded_warmup_steps
from seiscli.train.model import build_model, plan_for
from seiscli.train.optim import lr_at, param_groups
from seiscli.train.parallel import ENGINES, build_engine, engine_class
from seiscli.train.trainer import Trainer
from tests.distributed import run_distributed

STEP_KEYS = {"step", "loss", "lr", "grad_norm", "step_time_s", "data_wait_s", "samples_per_s", "tokens_per_s",
             "world_size", "time"}  # fmt: skip

# -- launch environment ------------------------------------------------------------------------------


def test_torchrun_environment() -> None:
    env = read_proc_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 4, 1, "torchrun")


def test_slurm_environment() -> None:
    env = read_proc_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "slurm")


def test_single_process_environment() -> None:
    assert read_proc_env({}) == distributed.ProcEnv(0, 1, 0, "single")


@pytest.mark.parametrize(
    ("environ", "match"),
    [({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"), ({"RANK": "2", "WORLD_SIZE": "2"}, "outside")],
)
def test_bad_environment(environ: dict[str, str], match: str) -> None:
    with pytest.raises(LaunchError, match=match):
        read_proc_env(environ)


def test_world_size_must_match_the_recipe() -> None:
    with pytest.raises(RecipeError, match=r"launched with 1 processes \(single\).*cluster.world_size is 2"):
        distributed.setup(load_recipe("smoke"), {})


def test_rendezvous_address_is_required() -> None:
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT not set"):
        distributed.setup(load_recipe("smoke"), {"RANK": "0", "WORLD_SIZE": "2"})


def test_dp_and_cp_ranks_put_cp_innermost() -> None:
    env = DistEnv(rank=5, world_size=8, local_rank=5, launcher="torchrun", device=torch.device("cpu"), cp=2)
    assert (env.dp_size, env.dp_rank, env.cp_rank) == (4, 2, 1)


# -- optimiser, engines, metrics ------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_follows_a_cosine_to_the_floor() -> None:
    optim = load_recipe("smoke", {"optim.lr": 1.0, "optim.warmup_steps": 4, "optim.min_lr_ratio": 0.1}).optim
    lrs = [lr_at(s, optim, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 15)))


def test_no_weight_decay_on_norms_biases_and_tokens() -> None:
    recipe = load_recipe("smoke")
    model = build_model(recipe, torch.device("cpu"))
    decay, no_decay = param_groups(model.named_parameters(), 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "encoder_norm.weight", "patch_embed.proj.bias"} <= skipped
    assert all(n.endswith(("bias", "_token")) or "norm" in n for n in skipped)
    assert {names[id(p)] for p in decay["params"]} >= {"patch_embed.proj.weight", "decoder_pred.weight"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_every_strategy_of_the_schema_has_an_engine() -> None:
    assert set(ENGINES) == set(STRATEGIES)
    for strategy in STRATEGIES:
        assert engine_class(strategy).__name__.endswith("Engine")


def test_summary_leaves_out_warmup_steps(tmp_path: Path) -> None:
    assert [excluded_warmup_steps(n) for n in (1, 2, 30, 500)] == [0, 1, 3, 10]
    log = MetricsLog(tmp_path, skip=1)
    for i, (sps, dt) in enumerate([(1.0, 8.0), (10.0, 1.0), (10.0, 1.0), (20.0, 2.0)]):
        log.log({"step": i + 1, "loss": float(i), "step_time_s": dt, "data_wait_s": dt / 2, "samples_per_s": sps,
                 "tokens_per_s": 8 * sps})  # fmt: skip
    log.close()
    s = log.summary(world_size=2)
    assert s["throughput_excludes_first_steps"] == 1 and s["samples_per_s"] == pytest.approx(60 / 4)
    assert s["tokens_per_s"] == pytest.approx(8 * 60 / 4) and "mfu" not in s
    assert s["data_wait_fraction"] == 0.5 and s["world_size"] == 2 and s["steps"] == 4 and s["final_loss"] == 3.0
    assert [r["step"] for r in _read_metrics(tmp_path)] == [1, 2, 3, 4]


# -- entry point exit codes ------------------------------------------------------------------------------


def test_missing_recipe_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.yaml"), "--run-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m seiscli.train: error:") and "does not exist" in err[0]


def test_wrong_world_size_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "smoke.yaml"
    path.write_text(load_recipe("smoke").to_yaml())
    assert main([str(path), "--run-dir", str(tmp_path / "run")]) == 2
    assert "cluster.world_size is 2" in capsys.readouterr().err


# -- DDP against one process -----------------------------------------------------------------------------

STEPS = 3


# The tiny model and schedule of the distributed tests (a few milliseconds a step on one CPU thread).
TINY: dict[str, Any] = {
    "model.patch_size": 4,
    "model.encoder_dim": 32,
    "model.decoder_dim": 16,
    "model.encoder_heads": 2,
    "model.decoder_heads": 2,
    "data.crop": [8, 8, 16],
    "optim.lr": 1e-2,
    "optim.warmup_steps": 1,
    "optim.weight_decay": 0.05,
}


def tiny_recipe(world_size: int, micro_batch: int, grad_accum: int) -> Recipe:
    return load_recipe(
        "smoke",
        {
            **TINY,
            "cluster.cpu_procs_per_node": world_size,
            "train.steps": STEPS,
            "train.micro_batch": micro_batch,
            "train.grad_accum": grad_accum,
            "optim.grad_clip": 0.05,  # small enough to clip: clipping must see the global gradient
        },
    )


def train_tiny(
    rank: int, world_size: int, recipe_data: dict, data: torch.Tensor, run_dir: str
) -> list[tuple[float, float]]:
    """Train STEPS steps on `data` (steps, global batch, ...): rank r's micro-batch a of a step holds the
    samples numbered (a * dp + r) * micro + b, as the trainer numbers them for masking."""
    recipe = validate(recipe_data)
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=1)
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    mb, accum = recipe.train.micro_batch, recipe.train.grad_accum
    batches = [
        data[step, (a * world_size + rank) * mb : (a * world_size + rank + 1) * mb]
        for step in range(STEPS)
        for a in range(accum)
    ]
    plan = plan_for(recipe)
    result = Trainer(recipe, env, engine, batches, plan, recipe_flops(recipe, plan), Path(run_dir)).run()
    assert result.signal is None and result.steps == STEPS
    # Parameters go through a file: a large result through run_distributed's queue would block the worker.
    params = {n: p.detach().float().numpy() for n, p in engine.module.named_parameters()}
    if rank == 0:
        np.savez(Path(run_dir) / "params.npz", **params)
    return [(r["loss"], r["grad_norm"]) for r in _read_metrics(Path(run_dir))]


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_params(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Parameters of a distributed run against the one-process reference, name by name."""
    assert got.keys() == want.keys()
    for name, p in want.items():
        g = got[name]
        if name.endswith("attn.qkv.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a per-query constant); Adam turns the
            # rounding noise left in it into full-size random steps, so only the query and value parts compare.
            d = p.shape[0] // 3
            g, p = np.delete(g, np.s_[d : 2 * d]), np.delete(p, np.s_[d : 2 * d])
        np.testing.assert_allclose(g, p, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_ddp_over_two_processes_equals_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = torch.randn(STEPS, 4, 1, 8, 8, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = train_tiny(0, 1, tiny_recipe(1, 2, 2).model_dump(mode="json"), data, str(tmp_path / "one"))
    two = run_distributed(train_tiny, 2, tiny_recipe(2, 1, 2).model_dump(mode="json"), data, str(tmp_path / "two"))
    assert len(one) == len(two) == STEPS
    for (l1, g1), (l2, g2) in zip(one, two, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert g2 == pytest.approx(g1, rel=1e-5)
        assert g1 > 0.05  # the clip was active
    params_one, params_two = (dict(np.load(tmp_path / d / "params.npz")) for d in ("one", "two"))
    assert_same_params(params_two, params_one)
    start = build_model(tiny_recipe(1, 2, 2), torch.device("cpu")).state_dict()
    assert all(not np.array_equal(start[n].numpy(), p) for n, p in params_one.items())


# -- real runs under torchrun ----------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["SEIS_DATA_DIR"] = str(tmp_path / "data")  # the synthetic volume's cache, private to the test
    return env


def _torchrun(recipe_path: Path, run_dir: Path, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "seiscli.train", str(recipe_path), "--run-dir", str(run_dir)]  # fmt: skip


@pytest.mark.slow
def test_smoke_recipe_trains_under_torchrun(tmp_path: Path) -> None:
    recipe = load_recipe("smoke")
    path = tmp_path / "smoke.yaml"
    path.write_text(recipe.to_yaml())
    run_dir = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run(_torchrun(path, run_dir), env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, recipe.train.steps + 1))
    assert all(r.keys() >= STEP_KEYS and r["world_size"] == 2 for r in records)
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    tenth = max(1, len(records) // 10)
    first = sum(r["loss"] for r in records[:tenth]) / tenth
    last = sum(r["loss"] for r in records[-tenth:]) / tenth
    assert last < first, f"loss did not fall: first 10% {first:.4f}, last 10% {last:.4f}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == recipe.train.steps
    assert summary["world_size"] == 2 and summary["device"] == "cpu" and summary["final_loss"] == records[-1]["loss"]
    print(f"\nsmoke: {wall:.1f} s wall (torchrun, 2 CPU procs), {summary['samples_per_s']:.1f} samples/s, "
          f"loss {first:.4f} -> {last:.4f}")  # fmt: skip


def _wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no {n} metrics lines after {timeout} s")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _long_recipe(tmp_path: Path, procs: int) -> Path:
    path = tmp_path / "long.yaml"
    path.write_text(load_recipe("smoke", {"train.steps": 100_000, "cluster.cpu_procs_per_node": procs}).to_yaml())
    return path


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_with_exit_143(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "seiscli.train", str(_long_recipe(tmp_path, 1)), "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run_dir, 3, proc)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["signal"] == signal.SIGTERM
    assert summary["steps"] == len(_read_metrics(run_dir)) >= 3


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = _torchrun(_long_recipe(tmp_path, 2), run_dir)
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(run_dir, 3, proc)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGTERM)  # the later-started worker: rank 1 as torchrun starts them in order
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0
    summary = json.loads((run_dir / "summary.json").read_text())  # written by rank 0, which got no signal
    assert summary["status"] == "stopped" and summary["signal"] == signal.SIGTERM, err[-3000:]
    assert summary["steps"] == len(_read_metrics(run_dir))
