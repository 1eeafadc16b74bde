"""Plain data parallelism: torch DistributedDataParallel over all ranks, full replicas of model and optimizer."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from seiscli.recipe import Recipe
from seiscli.train.distributed import DistEnv
from seiscli.train.model import MaskedAutoencoder3D
from seiscli.train.optim import build_optimizer, set_lr
from seiscli.train.parallel.engine import Engine, MicroBatch, autocast


class DDPEngine(Engine):
    name = "ddp"
    reshardable = True  # a full replica loads on any world size

    def __init__(self, model: MaskedAutoencoder3D, recipe: Recipe, env: DistEnv) -> None:
        super().__init__(model, recipe, env)
        self.ddp: DistributedDataParallel | None = None
        if env.distributed:
            self.ddp = DistributedDataParallel(
                model,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        # DDP averages gradients over its group; the loss is normalised for a sum (see engine.py).
        self.loss_factor = float(env.world_size)
        self.optimizer = build_optimizer(model, recipe.optim, env.device)

    def forward_backward(self, batch: MicroBatch, *, loss_scale: float, sync: bool) -> torch.Tensor:
        model = self.ddp or self.module
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with autocast(self.recipe, self.env.device):
                loss = model(batch.patches, batch.keep, batch.masked, offset=batch.offset, with_cls=batch.with_cls)
                loss = loss * loss_scale
            (loss * self.loss_factor).backward()
        return loss.detach()

    def step(self, lr: float) -> torch.Tensor:
        set_lr(self.optimizer, lr)
        clip = self.recipe.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def save(self, path: Path) -> None:
        # Every rank holds the same replica: rank 0 writes it whole.
        if self.env.is_main:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save(state, path / "model_optim.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "model_optim.pt", map_location=self.env.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
