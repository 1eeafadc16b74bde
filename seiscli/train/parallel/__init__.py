"""Parallel strategies behind one `Engine` interface; each strategy lives in its own module."""

from __future__ import annotations

import importlib

from seiscli.recipe import Recipe
from seiscli.train.distributed import DistEnv
from seiscli.train.model import MaskedAutoencoder3D
from seiscli.train.parallel.engine import Engine, MicroBatch

__all__ = ["ENGINES", "Engine", "MicroBatch", "build_engine", "engine_class"]

# strategy -> "module:class", imported only when chosen (DeepSpeed is heavy).
_ZERO = "seiscli.train.parallel.deepspeed_zero:DeepSpeedZeroEngine"
ENGINES: dict[str, str] = {
    "ddp": "seiscli.train.parallel.ddp:DDPEngine",
    "fsdp2": "seiscli.train.parallel.fsdp2:FSDP2Engine",
    "zero1": _ZERO,
    "zero2": _ZERO,
    "zero3": _ZERO,
}


def engine_class(strategy: str) -> type[Engine]:
    """The engine of a strategy the recipe schema allowed (tests pin that every allowed one has one)."""
    module, cls = ENGINES[strategy].split(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(model: MaskedAutoencoder3D, recipe: Recipe, env: DistEnv) -> Engine:
    return engine_class(recipe.parallelism.strategy)(model, recipe, env)
