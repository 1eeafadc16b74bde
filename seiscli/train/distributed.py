"""Process environment (torchrun or Slurm srun), device choice and the process group."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from seiscli.recipe import Recipe, RecipeError
from seiscli.train.errors import LaunchError


@dataclass(frozen=True)
class ProcEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    device: torch.device
    cp: int
    cp_group: Any = field(default=None, compare=False, repr=False)  # this rank's context-parallel group

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp

    @property
    def dp_rank(self) -> int:  # cp is the innermost mesh dimension: a cp group is consecutive ranks
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"environment variable {key}={environ[key]!r} is not an integer") from None


def read_proc_env(environ: Mapping[str, str] = os.environ) -> ProcEnv:
    """Rank and world size from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or from an srun task
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); torchrun wins when both are present (torchrun under srun)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        keys, launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        keys, launcher = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "slurm"
    else:
        return ProcEnv(0, 1, 0, "single")
    rank, world = _int(environ, keys[0]), _int(environ, keys[1])
    local = _int(environ, keys[2]) if keys[2] in environ else 0
    env = ProcEnv(rank, world, local, launcher)
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"rank {env.rank} is outside world size {env.world_size} ({env.launcher} environment)")
    return env


def choose_device(recipe: Recipe, local_rank: int) -> torch.device:
    want = recipe.train.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise RecipeError("train.device='cuda' but this node has no usable CUDA device; use 'cpu' or 'auto'")
    if want == "cpu" or not has_cuda:
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise LaunchError(f"local rank {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    return torch.device("cuda", local_rank)


def setup(recipe: Recipe, environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Check the launch against the recipe, pick the device, join the process group (world size > 1)."""
    proc = read_proc_env(environ)
    expected = recipe.cluster.world_size
    if proc.world_size != expected:
        raise RecipeError(
            f"launched with {proc.world_size} processes ({proc.launcher}) but the recipe's cluster.world_size is "
            f"{expected} (nodes {recipe.cluster.nodes} x {recipe.cluster.procs_per_node} per node); "
            "launch that many or change cluster.nodes / gpus_per_node / cpu_procs_per_node"
        )
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    device = choose_device(recipe, proc.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if proc.world_size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise LaunchError(
                f"{' and '.join(missing)} not set: the launcher (torchrun or the sbatch script) must export them"
            )
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}",
            rank=proc.rank,
            world_size=proc.world_size,
            timeout=timedelta(minutes=30),
            device_id=device if device.type == "cuda" else None,
        )
    cp = recipe.parallelism.cp
    return DistEnv(proc.rank, proc.world_size, proc.local_rank, proc.launcher, device, cp, cp_groups(cp, proc.rank))


def cp_groups(cp: int, rank: int) -> Any:
    """This rank's context-parallel group: cp consecutive ranks (cp is the innermost mesh dimension, so a
    group stays inside one node when cp <= GPUs per node). Every rank must create every group."""
    if cp == 1:
        return None
    mine = None
    for first in range(0, dist.get_world_size(), cp):
        group = dist.new_group(list(range(first, first + cp)))
        if first <= rank < first + cp:
            mine = group
    return mine


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
