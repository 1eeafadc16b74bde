"""FSDP2 engine against one process (real gloo processes), its DCP checkpoints across world sizes, and the
real entry point with strategy fsdp2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from seiscli.recipe import RecipeError, load_recipe, validate
from seiscli.train.distributed import DistEnv, cp_groups
from seiscli.train.flops import recipe_flops
from seiscli.train.model import batch_masks, build_model, patchify, plan_for
from seiscli.train.optim import lr_at
from seiscli.train.parallel import MicroBatch, build_engine
from seiscli.train.parallel.ddp import DDPEngine
from seiscli.train.trainer import Trainer
from tests.distributed import run_distributed
from tests.test_train_entry import STEPS, assert_same_params, tiny_recipe, train_tiny


def _fsdp2(recipe_data: dict[str, Any]) -> dict[str, Any]:
    recipe_data["parallelism"]["strategy"] = "fsdp2"
    return recipe_data


def _metrics(run_dir: Path) -> list[tuple[float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in records]


def _data() -> torch.Tensor:
    return torch.randn(STEPS, 4, 1, 8, 8, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_fsdp2_over_two_processes_equals_one_process(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _data()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = train_tiny(0, 1, tiny_recipe(1, 2, 2).model_dump(mode="json"), data, str(tmp_path / "one"))
    recipe = _fsdp2(tiny_recipe(2, 1, 2).model_dump(mode="json"))
    two = run_distributed(train_resumable, 2, recipe, data, str(tmp_path / "two"), 0, "")
    assert len(one) == len(two) == STEPS
    for (l1, g1), (l2, g2) in zip(one, two, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert g2 == pytest.approx(g1, rel=1e-5)
        assert g1 > 0.05  # the clip was active
    params_two = dict(np.load(tmp_path / "two" / "params.npz"))
    assert_same_params(params_two, dict(np.load(tmp_path / "one" / "params.npz")))


def train_resumable(
    rank: int, world_size: int, recipe_data: dict, data: torch.Tensor, run_dir: str, start: int, ckpt: str
) -> list[tuple[float, float]]:
    """Steps start..STEPS-1 of train_tiny's schedule. From start 0 it saves into `ckpt` (if given) after the
    first step; from any other start it first loads `ckpt`. The full (gathered) parameters go to
    run_dir/params.npz; returns (loss, grad_norm) per step."""
    recipe = validate(recipe_data)
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=1)
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    if start:
        engine.load(Path(ckpt))
    elif ckpt:
        step, calls = engine.step, []

        def step_then_save(lr: float) -> torch.Tensor:
            norm = step(lr)
            calls.append(lr)
            if len(calls) == 1:
                engine.save(Path(ckpt))
            return norm

        engine.step = step_then_save  # type: ignore[method-assign]
    mb, accum = recipe.train.micro_batch, recipe.train.grad_accum
    batches = [
        data[s, (a * world_size + rank) * mb : (a * world_size + rank + 1) * mb]
        for s in range(start, STEPS)
        for a in range(accum)
    ]
    plan = plan_for(recipe)
    Trainer(recipe, env, engine, batches, plan, recipe_flops(recipe, plan), Path(run_dir)).run(start_step=start)
    save_full_params(engine.module, Path(run_dir) / "params.npz", rank)
    return _metrics(Path(run_dir))


def save_full_params(module: torch.nn.Module, path: Path, rank: int) -> None:
    """Every rank gathers each sharded parameter (a collective); rank 0 writes them."""
    full = {}
    for name, p in module.named_parameters():
        t = p.detach()
        full[name] = (t.full_tensor() if isinstance(t, DTensor) else t).numpy()
    if rank == 0:
        np.savez(path, **full)


def _train_resumable_in(world_size: int, *args: Any) -> list[tuple[float, float]]:
    if world_size == 1:
        return train_resumable(0, 1, *args)
    return run_distributed(train_resumable, world_size, *args)


def _assert_resume_continues(tmp_path: Path) -> None:
    """The run resumed at step 2 (in tmp_path/loaded) continues the uninterrupted one (tmp_path/saved)."""
    saved, loaded = _metrics(tmp_path / "saved"), _metrics(tmp_path / "loaded")
    assert len(saved) == STEPS and len(loaded) == STEPS - 1
    for (l1, g1), (l2, g2) in zip(loaded, saved[1:], strict=True):
        assert l1 == pytest.approx(l2, rel=1e-5) and g1 == pytest.approx(g2, rel=1e-5)
    params = {d: dict(np.load(tmp_path / d / "params.npz")) for d in ("saved", "loaded")}
    assert_same_params(params["loaded"], params["saved"])


@pytest.mark.slow
@pytest.mark.parametrize(("saved_on", "loaded_on"), [(2, 1), (1, 2)])
def test_fsdp2_checkpoint_resumes_on_another_world_size(saved_on: int, loaded_on: int, tmp_path: Path) -> None:
    """Sharded (2 ranks) -> one plain module, and back: DCP reshards; model and optimizer state come back."""
    torch.set_num_threads(1)
    data, ckpt = _data(), tmp_path / "ckpt"
    ckpt.mkdir()
    for d in ("saved", "loaded"):
        (tmp_path / d).mkdir()
    recipe = {n: _fsdp2(tiny_recipe(n, 4 // (2 * n), 2).model_dump(mode="json")) for n in (saved_on, loaded_on)}
    _train_resumable_in(saved_on, recipe[saved_on], data, str(tmp_path / "saved"), 0, str(ckpt))
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == saved_on  # a file per rank
    # Resume at the second step: the schedule's last step has lr 0, so only the second one's update shows
    # whether the optimizer state (Adam's moments and step count) came back.
    _train_resumable_in(loaded_on, recipe[loaded_on], data, str(tmp_path / "loaded"), 1, str(ckpt))
    _assert_resume_continues(tmp_path)


@pytest.mark.slow
def test_smoke_recipe_trains_with_fsdp2_under_torchrun(tmp_path: Path) -> None:
    steps = 10
    recipe = load_recipe("smoke", {"parallelism.strategy": "fsdp2", "train.steps": steps})
    path = tmp_path / "smoke.yaml"
    path.write_text(recipe.to_yaml())
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["SEIS_DATA_DIR"] = str(tmp_path / "data")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "seiscli.train", str(path), "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _metrics(run_dir)
    assert len(losses) == steps and all(math.isfinite(loss) and math.isfinite(g) for loss, g in losses)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "fsdp2" and summary["world_size"] == 2


@pytest.mark.slow
def test_fsdp2_bf16_follows_the_fp32_run_and_keeps_fp32_master_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _data()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = train_tiny(0, 1, tiny_recipe(1, 2, 2).model_dump(mode="json"), data, str(tmp_path / "one"))
    recipe = _fsdp2(tiny_recipe(2, 1, 2).model_dump(mode="json"))
    recipe["train"]["precision"] = "bf16"
    two = run_distributed(train_resumable, 2, recipe, data, str(tmp_path / "two"), 0, "")
    for (l1, g1), (l2, g2) in zip(one, two, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-2) and g2 == pytest.approx(g1, rel=2e-2)
    assert all(p.dtype == np.float32 for p in np.load(tmp_path / "two" / "params.npz").values())


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("ac", ["none", "save_attention"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(ac: str) -> None:
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    data = _data()[0, :2]
    recipe = tiny_recipe(1, 2, 1)
    plan = plan_for(recipe)
    keep, masked = batch_masks(plan, 0, 0, [0, 1], 0)
    patches = patchify(data, recipe.model.patch_size)
    results = []
    for compile_ in (False, True):
        parallelism = {"strategy": "ddp", "compile": compile_, "activation_checkpointing": ac}
        r = validate({**recipe.model_dump(mode="json"), "parallelism": parallelism})
        model = build_model(r, torch.device("cpu"))
        loss = model(patches, keep, masked)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did go through inductor
    assert grads.keys() == eager_grads.keys()  # same parameter names: checkpoints do not change
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_fsdp2_over_two_processes_equals_eager_one_process(tmp_path: Path) -> None:
    """FSDP2's hooks stay eager around the compiled block forwards (about 2 min of compiling on 2 cores)."""
    torch.set_num_threads(1)
    data = _data()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = train_tiny(0, 1, tiny_recipe(1, 2, 2).model_dump(mode="json"), data, str(tmp_path / "one"))
    recipe = _fsdp2(tiny_recipe(2, 1, 2).model_dump(mode="json"))
    recipe["parallelism"]["compile"] = True
    two = run_distributed(train_resumable, 2, recipe, data, str(tmp_path / "two"), 0, "")
    for (l1, g1), (l2, g2) in zip(one, two, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-5)
    assert_same_params(dict(np.load(tmp_path / "two" / "params.npz")), dict(np.load(tmp_path / "one" / "params.npz")))


def train_cp(rank: int, world_size: int, recipe_data: dict, data: torch.Tensor, run_dir: str) -> None:
    """The Trainer with FSDP2 and cp groups of consecutive ranks: each rank holds one slab of its samples."""
    recipe = validate(recipe_data)
    cp = recipe.parallelism.cp
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=cp, cp_group=cp_groups(cp, rank))
    model = build_model(recipe, env.device)
    model.set_context_parallel(env.cp_group, recipe.model.attention)
    engine = build_engine(model, recipe, env)
    mb, dp, r = recipe.train.micro_batch, env.dp_size, env.dp_rank
    batches = [
        data[s, (a * dp + r) * mb : (a * dp + r + 1) * mb] for s in range(STEPS) for a in range(recipe.train.grad_accum)
    ]
    plan = plan_for(recipe)
    Trainer(recipe, env, engine, batches, plan, recipe_flops(recipe, plan), Path(run_dir)).run()
    save_full_params(engine.module, Path(run_dir) / "params.npz", rank)


@pytest.mark.slow
def test_fsdp2_with_context_parallel_equals_one_process(tmp_path: Path) -> None:
    """cp 2 (dp 1): the reduce-scatter over both ranks must SUM the slabs' gradients. The reference runs each
    whole sample in one process with the cp plan's masks (slab ids shifted to global positions)."""
    torch.set_num_threads(1)
    data = _data()
    recipe_data = _fsdp2(tiny_recipe(2, 2, 2).model_dump(mode="json"))
    recipe_data["parallelism"]["cp"] = 2
    run_distributed(train_cp, 2, recipe_data, data, str(tmp_path))
    _assert_cp_run_equals_one_process(recipe_data, data, tmp_path)


def _assert_cp_run_equals_one_process(recipe_data: dict, data: torch.Tensor, run_dir: Path) -> None:
    """train_cp's run in run_dir against one process that runs each micro-batch of all dp ranks whole, with
    the cp plan's masks (slab ids shifted to global positions)."""
    got = _metrics(run_dir)
    recipe = validate(recipe_data)
    plan = plan_for(recipe)
    env = DistEnv(0, 1, 0, "test", torch.device("cpu"), cp=1)
    ref = DDPEngine(build_model(recipe, env.device), recipe, env)  # one process: the plain module
    mb, accum = recipe.train.micro_batch * recipe.dp, recipe.train.grad_accum  # the micro-batches of all dp ranks
    s, cp = plan.slab_size, recipe.parallelism.cp
    want = []
    for step in range(STEPS):
        loss = 0.0
        for a in range(accum):
            ids = list(range(a * mb, (a + 1) * mb))
            masks = [batch_masks(plan, recipe.train.seed, step, ids, c) for c in range(cp)]
            keep = torch.cat([k + c * s for c, (k, _) in enumerate(masks)], dim=1)
            masked = torch.cat([m + c * s for c, (_, m) in enumerate(masks)], dim=1)
            batch = MicroBatch(patchify(data[step, a * mb : (a + 1) * mb], recipe.model.patch_size), keep, masked)
            loss += float(ref.forward_backward(batch, loss_scale=1 / (recipe.global_batch * plan.masked), sync=True))
        want.append((loss, float(ref.step(lr_at(step, recipe.optim, STEPS)))))
    for (l1, g1), (l2, g2) in zip(want, got, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5) and g2 == pytest.approx(g1, rel=1e-5)
    params = {n: p.detach().numpy() for n, p in ref.module.named_parameters()}
    assert_same_params(dict(np.load(run_dir / "params.npz")), params)


def test_compile_on_cpu_without_a_cxx_compiler_is_a_recipe_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    recipe = tiny_recipe(1, 1, 1).model_dump(mode="json")
    recipe["parallelism"]["compile"] = True
    with pytest.raises(RecipeError, match=r"parallelism.compile=true on CPU needs a C\+\+ compiler"):
        build_model(validate(recipe), torch.device("cpu"))


def count_reduce_scatters(rank: int, world_size: int, recipe_data: dict, data: torch.Tensor) -> list[int]:
    """Reduce-scatters issued by a sync=False micro-batch, then by a sync=True one."""
    recipe = validate(recipe_data)
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=1)
    engine = build_engine(build_model(recipe, env.device), recipe, env)
    plan = plan_for(recipe)
    trainer = Trainer(recipe, env, engine, [], plan, recipe_flops(recipe, plan), Path("."))
    calls: list[int] = []
    real = dist.reduce_scatter_single

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    dist.reduce_scatter_single = counted  # type: ignore[assignment]  # what FSDP2's default reduce-scatter calls
    counts = []
    for a, sync in enumerate((False, True)):
        before = len(calls)
        engine.forward_backward(trainer.micro_batch(data[0, a : a + 1], 0, a), loss_scale=1.0, sync=sync)
        counts.append(len(calls) - before)
    return counts


@pytest.mark.slow
def test_fsdp2_skips_the_reduce_scatter_while_accumulating() -> None:
    recipe = _fsdp2(tiny_recipe(2, 1, 2).model_dump(mode="json"))
    blocks = recipe["model"]["encoder_depth"] + recipe["model"]["decoder_depth"]
    # One reduce-scatter per FSDP unit (each block and the root) on the last micro-batch, none before.
    assert run_distributed(count_reduce_scatters, 2, recipe, _data()) == [0, blocks + 1]


# Hybrid sharding (parallelism.fsdp_shard_size): shard within groups, replicate across them.


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"parallelism.strategy": "ddp"}, ["parallelism.fsdp_shard_size=2", "strategy=ddp", "allowed: strategy fsdp2"]),
        ({"cluster.cpu_procs_per_node": 6, "parallelism.fsdp_shard_size": 4}, ["fsdp_shard_size=4", "world size 6"]),
        ({"cluster.cpu_procs_per_node": 8, "parallelism.cp": 4}, ["fsdp_shard_size=2", "multiple of parallelism.cp=4"]),
        ({"parallelism.fsdp_shard_size": 0}, ["parallelism.fsdp_shard_size", "greater than or equal to 1"]),
    ],
)
def test_bad_fsdp_shard_size_names_the_field(overrides: dict[str, Any], needles: list[str]) -> None:
    base = {"parallelism.strategy": "fsdp2", "cluster.cpu_procs_per_node": 4, "parallelism.fsdp_shard_size": 2}
    with pytest.raises(RecipeError) as exc:
        load_recipe("smoke", {**base, **overrides})
    msg = str(exc.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_fsdp_shard_size_that_fits_validates() -> None:
    overrides = {"parallelism.strategy": "fsdp2", "cluster.cpu_procs_per_node": 8, "parallelism.cp": 2}
    assert load_recipe("smoke", {**overrides, "parallelism.fsdp_shard_size": 4}).parallelism.fsdp_shard_size == 4
    assert load_recipe("smoke", overrides).parallelism.fsdp_shard_size is None  # today's mesh over all ranks


def _hsdp(world_size: int, shard_size: int | None, micro_batch: int, grad_accum: int) -> dict[str, Any]:
    recipe = _fsdp2(tiny_recipe(world_size, micro_batch, grad_accum).model_dump(mode="json"))
    recipe["parallelism"]["fsdp_shard_size"] = shard_size
    return recipe


def mesh_of(rank: int, world_size: int, recipe_data: dict) -> tuple[tuple[str, ...], tuple[int, ...], list[int]]:
    """The mesh a sharded parameter lives on: dimension names, shape, and rank 0's shard group."""
    recipe = validate(recipe_data)
    env = DistEnv(rank, world_size, 0, "test", torch.device("cpu"), cp=1)
    p = next(build_engine(build_model(recipe, env.device), recipe, env).module.parameters())
    assert isinstance(p, DTensor)
    mesh = p.device_mesh
    return mesh.mesh_dim_names or (), tuple(mesh.shape), dist.get_process_group_ranks(mesh.get_group("shard"))


@pytest.mark.slow
def test_fsdp2_hybrid_mesh_shards_within_consecutive_ranks() -> None:
    assert run_distributed(mesh_of, 4, _hsdp(4, 2, 1, 1)) == (("replicate", "shard"), (2, 2), [0, 1])


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "shard_size"), [(4, 2), (2, 1)])
def test_fsdp2_hybrid_sharding_equals_one_process(world_size: int, shard_size: int, tmp_path: Path) -> None:
    """HSDP 2x2: the reduce-scatter within a pair and the all-reduce across pairs must together give the SUM
    over all 4 ranks; the clip needs the global norm. Shard size 1 is pure replication (no reduce-scatter)."""
    torch.set_num_threads(1)
    data = torch.randn(STEPS, 8, 1, 8, 8, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    one = train_tiny(0, 1, tiny_recipe(1, 4, 2).model_dump(mode="json"), data, str(tmp_path / "one"))
    recipe = _hsdp(world_size, shard_size, 4 // world_size, 2)
    many = run_distributed(train_resumable, world_size, recipe, data, str(tmp_path / "many"), 0, "")
    assert len(one) == len(many) == STEPS
    for (l1, g1), (l2, g2) in zip(one, many, strict=True):
        assert l2 == pytest.approx(l1, rel=1e-5)
        assert g2 == pytest.approx(g1, rel=1e-5)
        assert g1 > 0.05  # the clip was active
    assert_same_params(dict(np.load(tmp_path / "many" / "params.npz")), dict(np.load(tmp_path / "one" / "params.npz")))


HYBRID_2X2, FULL_2 = (4, 2, 1, 1), (2, None, 1, 2)  # (world, shard size, micro batch, accumulation)


@pytest.mark.slow
@pytest.mark.parametrize(("saved_on", "loaded_on"), [(HYBRID_2X2, FULL_2), (FULL_2, HYBRID_2X2)])
def test_fsdp2_hybrid_checkpoint_reshards(saved_on: tuple, loaded_on: tuple, tmp_path: Path) -> None:
    """HSDP 2x2 on 4 ranks <-> FSDP over 2 ranks: DCP stores global tensors whatever the mesh."""
    torch.set_num_threads(1)
    data, ckpt = _data(), tmp_path / "ckpt"
    ckpt.mkdir()
    for d in ("saved", "loaded"):
        (tmp_path / d).mkdir()
    run_distributed(train_resumable, saved_on[0], _hsdp(*saved_on), data, str(tmp_path / "saved"), 0, str(ckpt))
    assert (ckpt / ".metadata").is_file()
    # Resume at the second step (as in the world-size test above: its update shows Adam's state came back).
    run_distributed(train_resumable, loaded_on[0], _hsdp(*loaded_on), data, str(tmp_path / "loaded"), 1, str(ckpt))
    _assert_resume_continues(tmp_path)


@pytest.mark.slow
def test_fsdp2_hybrid_with_context_parallel_equals_one_process(tmp_path: Path) -> None:
    """The long-context layout in small: cp 2, shard size 2 (a shard group is a cp group), dp 2 replicas."""
    torch.set_num_threads(1)
    data = _data()
    recipe_data = _hsdp(4, 2, 1, 2)
    recipe_data["parallelism"]["cp"] = 2
    run_distributed(train_cp, 4, recipe_data, data, str(tmp_path))
    _assert_cp_run_equals_one_process(recipe_data, data, tmp_path)
