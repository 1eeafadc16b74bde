"""ZeRO stages 1, 2 and 3 through DeepSpeed: optimizer states (1), plus gradients (2), plus parameters (3)
partitioned over the data-parallel ranks.

Gradient scaling (see engine.py): DeepSpeed's reduction averages gradients over the dp group
(`stage_1_and_2.py` average_tensor / `stage3.py` __avg_scatter_grads divide by the dp world size), and
`engine.backward` divides the loss by gradient_accumulation_steps unless scale_wrt_gas=False. We pass
scale_wrt_gas=False and multiply the loss by the dp size, so the optimizer sees the sum over ranks of the
local gradients. The trainer decides the accumulation boundary (`sync`), DeepSpeed does not count micro-steps.

Checkpoints are DeepSpeed's per-rank shards. The same dp size loads them as saved (a bit-identical resume);
another dp size (a run that lost or gained nodes) loads them through DeepSpeed's universal checkpoint: rank 0
runs `ds_to_universal` once into `engine-universal/` beside the checkpoint's `engine/`, and every rank takes its
new partition of the same fp32 master weights and Adam moments from there.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from seiscli.recipe import Recipe
from seiscli.train.distributed import DistEnv
from seiscli.train.errors import CheckpointError
from seiscli.train.model import MaskedAutoencoder3D
from seiscli.train.optim import build_optimizer, set_lr
from seiscli.train.parallel.engine import Engine, MicroBatch

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}
CONFIG_FILE = "deepspeed_config.json"
META_FILE = "zero_meta.json"  # our own record of what the checkpoint was saved with
TAG = "zero"  # one fixed tag: the checkpoint manager owns the directory, DeepSpeed's `latest` is not needed


def ds_config(recipe: Recipe, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a recipe (pure: no torch.distributed, no DeepSpeed import)."""
    t, p = recipe.train, recipe.parallelism
    stage = STAGES[p.strategy]
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": p.reduce_bucket_size,
    }
    if stage < 3:  # stage 3 gathers parameters with its own prefetch buckets instead
        zero["allgather_bucket_size"] = p.allgather_bucket_size
    return {
        # Reduce and accumulate gradients in fp32 as DDP and FSDP2 do. Unset, DeepSpeed 0.19.8 follows the model
        # dtype for both (engine.py communication_data_type, get_data_types): under bf16 every hop of a 128-rank
        # ring reduction rounds to 8 bits of mantissa, ~1e-2 relative error in the sum (BENCHMARKS.md).
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch * t.grad_accum * dp_size,
        "gradient_clipping": recipe.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built DeepSpeed op on nodes or in CI
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed's progress lines out
        "wall_clock_breakdown": False,
    }


def _join_process_group(env: DistEnv) -> None:
    """DeepSpeed must run on the group distributed.setup created; a single process gets a private one."""
    import deepspeed

    # DeepSpeed's engine asserts LOCAL_RANK is set and takes its device from it (`_set_distributed_vars`);
    # torchrun sets it, srun only SLURM_LOCALID, a spawned test worker nothing.
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    if not dist.is_initialized():  # one process: distributed.setup made no group, DeepSpeed needs one
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    # A no-op on an initialised group apart from wrapping it in DeepSpeed's comm backend.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)


class DeepSpeedZeroEngine(Engine):
    name = "zero"
    # Stages 1, 2 and 3 (fp32 and bf16): a checkpoint of another dp size is converted to DeepSpeed's universal
    # layout and loaded from there (`_load_universal`).
    reshardable = True

    def __init__(self, model: MaskedAutoencoder3D, recipe: Recipe, env: DistEnv) -> None:
        super().__init__(model, recipe, env)
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.name = recipe.parallelism.strategy
        _join_process_group(env)
        self.config = ds_config(recipe, env.dp_size)
        self.loss_factor = float(env.dp_size)  # undo the dp averaging (engine.py: the sum over ranks)
        optimizer = build_optimizer(model, recipe.optim, env.device)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        self.dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32

    def config_files(self) -> dict[str, dict]:
        return {CONFIG_FILE: self.config}

    def forward_backward(self, batch: MicroBatch, *, loss_scale: float, sync: bool) -> torch.Tensor:
        # The trainer owns the accumulation boundary: ZeRO-1 reduces only there, ZeRO-2/3 finalise there.
        self.ds.set_gradient_accumulation_boundary(sync)
        # DeepSpeed's bf16 casts the parameters, not the inputs.
        patches = batch.patches.to(self.dtype)
        loss = self.ds(patches, batch.keep, batch.masked, offset=batch.offset, with_cls=batch.with_cls)
        loss = loss.float() * loss_scale
        self.ds.backward(loss * self.loss_factor, scale_wrt_gas=False)
        return loss.detach()

    def evaluate(self, batch: MicroBatch) -> torch.Tensor:
        with torch.no_grad():  # through DeepSpeed's engine: ZeRO-3 gathers the partitioned parameters
            return self.ds(batch.patches.to(self.dtype), batch.keep, batch.masked, offset=batch.offset,
                           with_cls=batch.with_cls).float()  # fmt: skip

    def step(self, lr: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        self.ds.step()
        # ZeRO-1/2/3 all report the global L2 norm of the reduced gradients before clipping, all-reduced over
        # the dp group (None before the first step): a 0-d float32 tensor for stages 1 and 2, float64 for
        # stage 3. As float32 it is the value clip_grad_norm_ returns for DDP.
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm is off)")
        return torch.as_tensor(norm, dtype=torch.float32).detach().reshape(())

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag=TAG, save_latest=False)
        if self.env.is_main:
            meta = {"strategy": self.recipe.parallelism.strategy, "dp_world_size": self.env.dp_size}
            (path / META_FILE).write_text(json.dumps(meta) + "\n")

    def load(self, path: Path) -> None:
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise CheckpointError(f"{path} holds no ZeRO checkpoint ({META_FILE} is missing)")
        meta = json.loads(meta_path.read_text())
        strategy = self.recipe.parallelism.strategy
        if meta["strategy"] != strategy:
            raise CheckpointError(
                f"checkpoint {path} was saved with strategy {meta['strategy']!r}, this run uses {strategy!r}; "
                f"resume with strategy {meta['strategy']!r}"
            )
        if meta["dp_world_size"] == self.env.dp_size:  # the shards as saved: a bit-identical resume
            loaded, _ = self.ds.load_checkpoint(str(path), tag=TAG, load_lr_scheduler_states=False)
        else:
            loaded = self._load_universal(path, meta["dp_world_size"])
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")

    def _load_universal(self, path: Path, saved_dp: int) -> str | None:
        """Load a checkpoint of another dp size: converted once (rank 0) into DeepSpeed's universal layout,
        one file per parameter and state (fp32 master weights, Adam moments) with the dp padding removed,
        which every rank then slices for the new dp size."""
        universal = path.with_name(f"{path.name}-universal")
        failure = None
        if self.env.is_main and not universal.is_dir():
            failure = _convert_to_universal(path / TAG, universal)
        if dist.get_world_size() > 1:  # nobody reads before the converted directory is complete
            box = [failure]
            dist.broadcast_object_list(box, src=0)
            failure = box[0]
        if failure:
            raise CheckpointError(f"cannot convert checkpoint {path} to DeepSpeed's universal format: {failure}")
        # The config's checkpoint.load_universal, read only inside load_checkpoint (engine.py
        # load_universal_checkpoint()), switched on for this load alone: a same-size resume stays the plain load.
        config = self.ds._config
        adam = self.ds.optimizer.optimizer  # the torch AdamW inside DeepSpeed's ZeRO optimizer
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in adam.param_groups]
        config.load_universal_checkpoint = True
        try:
            loaded, _ = self.ds.load_checkpoint(str(universal), tag=TAG, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = False
        if STAGES[self.recipe.parallelism.strategy] == 3:
            # DeepSpeed 0.19.8's stage-3 universal load (stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3)
            # gives every param group the hyperparameters of group 0 (line 3687: weight decay on our no-decay
            # group) and all of them one shared `step` tensor (line 3681), which AdamW then increments once per
            # group each step (wrong bias correction). Put back our groups' settings and one step per state.
            for group, settings in zip(adam.param_groups, hyper, strict=True):
                group.update(settings)
            for state in adam.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if self.env.is_main:
            print(
                f"resharded {path} from {saved_dp} to {self.env.dp_size} data-parallel ranks via {universal}",
                flush=True,
            )
        return loaded


def _convert_to_universal(source: Path, dest: Path) -> str | None:
    """deepspeed.checkpoint.ds_to_universal into `dest` (written as `dest`.tmp, then renamed: a directory
    that exists is complete); returns why it failed, None on success."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = dest.with_name(f"{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = SimpleNamespace(
        input_folder=str(source),
        output_folder=str(tmp / TAG),  # it also writes `latest_universal` beside this, inside tmp
        num_extract_workers=1,  # in-process: no process pool inside a training rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our model sets no UNIVERSAL_CHECKPOINT_INFO (only tensor parallelism needs it)
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress prints and bars
            ds_to_universal(args)
    except Exception as e:  # every rank must hear of it, not just rank 0 (the others wait in a broadcast)
        shutil.rmtree(tmp, ignore_errors=True)
        return f"{type(e).__name__}: {e}".splitlines()[0]
    os.rename(tmp, dest)
    return None
