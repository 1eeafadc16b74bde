"""The 3D MAE model, its masking plan and its position embedding."""

from __future__ import annotations

from fractions import Fraction

import torch

from seiscli.recipe import Recipe, RecipeError
from seiscli.train.model.mae3d import MaskedAutoencoder3D, patchify
from seiscli.train.model.masking import Plan, batch_masks, plan_lengths

__all__ = ["MaskedAutoencoder3D", "Plan", "batch_masks", "build_model", "patchify", "plan_for", "plan_lengths"]


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
    return model.to(device)


def plan_for(recipe: Recipe) -> Plan:
    try:
        return plan_lengths(recipe.num_tokens, Fraction(str(recipe.model.mask_ratio)), recipe.parallelism.cp)
    except ValueError as e:
        raise RecipeError(f"model.mask_ratio={recipe.model.mask_ratio}, data.crop {recipe.data.crop}: {e}") from None
