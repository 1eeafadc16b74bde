"""The interface every parallel strategy implements (DDP now; ZeRO-1/2/3 and FSDP2 in sibling modules).

An engine owns the wrapped model and the optimizer. The trainer hands it micro-batches whose loss is
already normalised by the global masked-patch count of the optimizer step (research notes section 7.5):
the gradient the optimizer must see is the SUM over ranks of the local gradients, and each engine scales
the loss to undo whatever averaging its gradient reduction does (DDP averages over its group, so it
multiplies by the group size). The strategy-equivalence test against one process pins this.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seiscli.recipe import Recipe
from seiscli.train.distributed import DistEnv
from seiscli.train.model import MaskedAutoencoder3D


@dataclass
class MicroBatch:
    """One micro-batch as the model consumes it (see `MaskedAutoencoder3D.forward`)."""

    patches: torch.Tensor
    keep: torch.Tensor
    masked: torch.Tensor
    offset: int = 0
    with_cls: bool = True


def autocast(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when the recipe asks for bf16 (fp32 master weights and gradients), else nothing."""
    if recipe.train.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Engine(ABC):
    name: str

    def __init__(self, model: MaskedAutoencoder3D, recipe: Recipe, env: DistEnv) -> None:
        self.module = model
        self.recipe = recipe
        self.env = env

    @abstractmethod
    def forward_backward(self, batch: MicroBatch, *, loss_scale: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns this rank's loss (sum over its masked patches
        x loss_scale), detached. sync=False on all but the last micro-batch of a step lets the engine skip
        gradient communication while accumulating."""

    @abstractmethod
    def step(self, lr: float) -> torch.Tensor:
        """Clip, apply the optimizer at `lr`, zero the gradients; returns the global gradient norm before
        clipping (a 0-d tensor, the same on every rank)."""

    def evaluate(self, batch: MicroBatch) -> torch.Tensor:
        """This rank's loss sum over the masked patches of `batch`, no gradient (held-out eval in training).
        Collective where the forward is (FSDP2, ZeRO-3): every rank calls it with its own batch."""
        with torch.no_grad(), autocast(self.recipe, self.env.device):
            return self.module(batch.patches, batch.keep, batch.masked, offset=batch.offset, with_cls=batch.with_cls)

    def config_files(self) -> dict[str, dict]:
        """Files (name -> JSON-able content) the entry point writes into the run directory, e.g. the
        generated DeepSpeed config, so a run records what its strategy was configured with."""
        return {}

    # Whether `load` accepts a checkpoint saved with another data-parallel world size.
    reshardable: bool = False

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write model and optimizer state into the directory `path` (already created; on a filesystem all
        ranks see). Every rank calls it, collectively; each writes what it owns (a replica's rank 0 writes
        everything, a sharded strategy writes its shards). Nothing else is written there by the engine."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore what `save` wrote into `path`. Every rank calls it. Raises CheckpointError (one line,
        what differs and what is allowed) when the checkpoint cannot be loaded into this engine, e.g. another
        world size on a strategy that is not reshardable."""
