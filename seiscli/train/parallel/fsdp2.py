"""FSDP2: torch's `fully_shard` per transformer block, then the root; parameters, gradients and optimizer
state sharded over every rank.

Mesh: all ranks, i.e. data parallel x context parallel flattened (torchtitan's `fsdp = dp_shard x cp`, and
what DDPEngine does with the default group). Ranks of a cp group hold the same parameters, and their
gradients must be summed like those of dp ranks, so one reduce-scatter over the world covers both.

Hybrid sharding (`parallelism.fsdp_shard_size` N < world): a 2-D mesh (replicate, shard) = (world/N, N) of
consecutive ranks, torch's HSDP. Parameters are sharded within a group of N (one node: the per-layer
all-gathers and reduce-scatters stay on NVLink) and replicated across groups; after its reduce-scatter each
unit all-reduces its gradient shard over the replicate dimension, the one collective that crosses nodes.

Gradient reduction: FSDP2 divides by the group size by default; with divide factor 1 it would use
PREMUL_SUM(1.0), which gloo lacks, so the engine also forces plain SUM collectives. That gives exactly the
SUM over ranks that the loss convention needs (engine.py) on NCCL and on gloo, and sidesteps gloo's
reduce-scatter that sums where FSDP asks for AVG (pytorch/pytorch#162338). Under HSDP the two settings
cover both collectives: torch 2.13's `_get_gradient_divide_factors` then returns SUM for the
reduce-scatter and for the replicate all-reduce and a post-divide of 1 (without force-sum the all-reduce
is a SUM too, but the reduce-scatter a PREMUL_SUM).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from seiscli.recipe import Recipe
from seiscli.train.distributed import DistEnv
from seiscli.train.errors import CheckpointError
from seiscli.train.model import MaskedAutoencoder3D
from seiscli.train.optim import build_optimizer, set_lr
from seiscli.train.parallel.engine import Engine, MicroBatch, autocast


def device_mesh(env: DistEnv, shard_size: int | None) -> DeviceMesh:
    """All ranks, or (replicate, shard) with groups of `shard_size` consecutive ranks (rank-major layout)."""
    if shard_size is None or shard_size >= env.world_size:
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("dp_cp",))
    shape = (env.world_size // shard_size, shard_size)
    return init_device_mesh(env.device.type, shape, mesh_dim_names=("replicate", "shard"))


def shard(model: MaskedAutoencoder3D, env: DistEnv, bf16: bool, shard_size: int | None = None) -> None:
    """fully_shard each encoder and decoder block, then the root (which takes the remaining parameters)."""
    mesh = device_mesh(env, shard_size)
    # fp32: the default policy casts nothing. bf16: torchtitan's policy (bf16 compute, fp32 reduction and
    # master weights). The root keeps its fp32 inputs, as the norm-pix targets come from the patches;
    # autocast casts for the root's own layers.
    bf = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if bf16 else {}
    mp, root_mp = MixedPrecisionPolicy(**bf), MixedPrecisionPolicy(**bf, cast_forward_inputs=not bf16)
    for block in [*model.encoder, *model.decoder]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # The root's parameters (embedding, norms, prediction head) are the first the backward needs: not
    # resharding them after the forward saves an all-gather.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=root_mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


class FSDP2Engine(Engine):
    name = "fsdp2"
    reshardable = True  # DCP stores global tensors: any world size loads them

    def __init__(self, model: MaskedAutoencoder3D, recipe: Recipe, env: DistEnv) -> None:
        super().__init__(model, recipe, env)
        # One process (no process group) trains the plain module; DCP still reads and writes the same format.
        self.sharded = env.distributed
        if self.sharded:
            shard(model, env, recipe.train.precision == "bf16", recipe.parallelism.fsdp_shard_size)
        self.optimizer = build_optimizer(model, recipe.optim, env.device)

    def forward_backward(self, batch: MicroBatch, *, loss_scale: float, sync: bool) -> torch.Tensor:
        if self.sharded:
            # Off while accumulating: gradients stay unsharded and local until the last micro-batch.
            self.fsdp.set_requires_gradient_sync(sync)
        with autocast(self.recipe, self.env.device):
            loss = self.module(batch.patches, batch.keep, batch.masked, offset=batch.offset, with_cls=batch.with_cls)
            loss = loss * loss_scale
        loss.backward()  # gradients are summed over ranks as they are (module docstring)
        return loss.detach()

    @property
    def fsdp(self) -> FSDPModule:
        assert isinstance(self.module, FSDPModule)
        return self.module

    def step(self, lr: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # A partial norm of the local shards (replicated across HSDP's groups): reduce it to the global one.
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        clip = self.recipe.optim.grad_clip
        if clip > 0 and math.isfinite(clip):
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def _state(self) -> dict[str, dict]:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optimizer": optim_sd}

    def save(self, path: Path) -> None:
        dcp.save(self._state(), checkpoint_id=path)

    def load(self, path: Path) -> None:
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} holds no torch.distributed.checkpoint (.metadata missing); "
                                  "fsdp2 loads only checkpoints that fsdp2 saved")  # fmt: skip
        state = self._state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
