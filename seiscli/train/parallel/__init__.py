"""Parallel strategies behind one `Engine` interface; each strategy lives in its own module."""

from __future__ import annotations

import importlib

from seiscli.recipe import Recipe, RecipeError
from seiscli.train.distributed import DistEnv
from seiscli.train.model import MaskedAutoencoder3D
from seiscli.train.parallel.engine import Engine, MicroBatch

__all__ = ["ENGINES", "Engine", "MicroBatch", "build_engine", "engine_class"]

# strategy -> "module:class", imported only when chosen (DeepSpeed is heavy).
ENGINES: dict[str, str] = {"ddp": "seiscli.train.parallel.ddp:DDPEngine"}


def engine_class(strategy: str) -> type[Engine]:
    if strategy not in ENGINES:
        implemented = ", ".join(ENGINES)
        raise RecipeError(f"parallelism.strategy={strategy!r} is not implemented yet; implemented: {implemented}")
    module, cls = ENGINES[strategy].split(":")
    return getattr(importlib.import_module(module), cls)


def build_engine(model: MaskedAutoencoder3D, recipe: Recipe, env: DistEnv) -> Engine:
    return engine_class(recipe.parallelism.strategy)(model, recipe, env)
