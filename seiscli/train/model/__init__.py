"""The 3D MAE model, its masking plan and its position embedding."""

from __future__ import annotations

import os
import shutil
from fractions import Fraction

import torch

from seiscli.recipe import Recipe, RecipeError
from seiscli.train.model.mae3d import MaskedAutoencoder3D, patchify
from seiscli.train.model.masking import Plan, batch_masks, plan_lengths

__all__ = [
    "MaskedAutoencoder3D",
    "Plan",
    "batch_masks",
    "build_model",
    "compile_blocks",
    "patchify",
    "plan_for",
    "plan_lengths",
]


def build_model(recipe: Recipe, device: torch.device) -> MaskedAutoencoder3D:
    """The recipe's model, initialised from recipe.train.seed (identical on every rank), on `device`."""
    m = recipe.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        model = MaskedAutoencoder3D(
            grid=recipe.grid,
            patch_size=m.patch_size,
            in_chans=m.in_chans,
            encoder_depth=m.encoder_depth,
            encoder_dim=m.encoder_dim,
            encoder_heads=m.encoder_heads,
            decoder_depth=m.decoder_depth,
            decoder_dim=m.decoder_dim,
            decoder_heads=m.decoder_heads,
            mlp_ratio=m.mlp_ratio,
            norm_pix_loss=m.norm_pix_loss,
            attention=m.attention,
            device_type=device.type,
            activation_checkpointing=recipe.parallelism.activation_checkpointing,
        )
    if recipe.parallelism.compile:
        compile_blocks(model, device)
    return model.to(device)


def compile_blocks(model: MaskedAutoencoder3D, device: torch.device) -> None:
    """torch.compile each encoder and decoder block's forward in place, before any strategy wraps the model
    (torchtitan's order). Per block: one compiled graph serves every block of a stack. In place, not as
    `torch.compile(block)`: parameter names keep no `_orig_mod.`, so checkpoints and optimizer groups do not
    change, and the hooks strategies add (FSDP2's all-gathers) stay eager around the compiled forward.
    Ring attention is excluded from the graphs by mae3d's `_eager`."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, ("g++", "c++", "clang++")))):
        raise RecipeError(
            "parallelism.compile=true on CPU needs a C++ compiler (g++, c++, clang++ or $CXX) and none was "
            "found on this node; install one or set parallelism.compile: false"
        )
    for block in [*model.encoder, *model.decoder]:
        block.forward = torch.compile(block.forward)  # type: ignore[method-assign]


def plan_for(recipe: Recipe) -> Plan:
    """The run's masking plan: one mask stratum per z patch plane, which every allowed cp divides, so a
    sample's mask (and the loss) does not depend on parallelism.cp."""
    cp, gz = recipe.parallelism.cp, recipe.grid[0]
    if gz % cp:
        raise RecipeError(
            f"parallelism.cp={cp} does not divide the crop's {gz} patch planes along z (data.crop z / "
            f"model.patch_size); allowed: a divisor of {gz}"
        )
    try:
        return plan_lengths(recipe.num_tokens, Fraction(str(recipe.model.mask_ratio)), cp, strata=gz)
    except ValueError as e:
        raise RecipeError(f"model.mask_ratio={recipe.model.mask_ratio}, data.crop {recipe.data.crop}: {e}") from None
