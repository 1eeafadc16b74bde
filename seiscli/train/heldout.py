"""Held-out crops and the masked-reconstruction metrics on them (`seis eval`, and periodically in training).

Crops come from the held-out inlines only (seiscli/data/split.py), never flipped, drawn from (eval.seed, i)
alone; masks come from the trainer's own `batch_masks` with the eval seed at step 0. So every checkpoint of
a recipe, whatever its strategy or world size, is scored on the same voxels and the same masks. Sample i
takes volume i mod (number of volumes): a fixed, balanced share whatever the volumes' sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seiscli.data.split import train_inlines
from seiscli.data.volume import Volume
from seiscli.data.write import FAULTS
from seiscli.recipe import Recipe
from seiscli.train.data import CropDataset, CropSpec
from seiscli.train.model import MaskedAutoencoder3D, Plan, batch_masks, patchify

Shape3 = tuple[int, int, int]
_HELDOUT, _PROBE_TRAIN = 0xE7A1, 0x9B0E  # stream tags: the two draws never share a generator


@dataclass(frozen=True)
class Crops:
    """Normalised crops (n, 1, cz, cy, cx) float32, their fault labels (n, cz, cy, cx) uint8 when every
    volume has them, and where each came from."""

    data: torch.Tensor
    labels: torch.Tensor | None
    specs: list[CropSpec]


def draw_specs(
    volumes: list[Volume], crop: Shape3, fraction: float, n: int, seed: int, heldout: bool
) -> list[CropSpec]:
    """`n` crop positions inside the held-out inlines (heldout) or inside the training inlines (not)."""
    specs = []
    for i in range(n):
        v = i % len(volumes)
        vol = volumes[v]
        first = train_inlines(vol.shape[0], fraction)
        lo, hi = (first, vol.shape[0]) if heldout else (0, first)
        if hi - lo < crop[0]:
            where = "held-out" if heldout else "training"
            raise ValueError(
                f"{vol.uri} {vol.shape}: its {where} region (inlines {lo}..{hi - 1} under data.holdout_fraction="
                f"{fraction}) is narrower than data.crop z={crop[0]}; allowed: a fraction that leaves both at "
                f"least {crop[0]} inlines"
            )
        rng = np.random.default_rng([seed % 2**63, _HELDOUT if heldout else _PROBE_TRAIN, i])
        origin = (
            lo + int(rng.integers(0, hi - lo - crop[0] + 1)),
            int(rng.integers(0, vol.shape[1] - crop[1] + 1)),
            int(rng.integers(0, vol.shape[2] - crop[2] + 1)),
        )
        specs.append(CropSpec(v, origin, False, False, False, 1.0))
    return specs


def read_crops(dataset: CropDataset, specs: list[CropSpec], labels: bool) -> Crops:
    """Read (and normalise, as the training loader does) the crops of `specs`; fault labels when asked for
    and present in every volume."""
    crop = dataset.crop
    data = torch.empty((len(specs), 1, *crop), dtype=torch.float32)
    for i, spec in enumerate(specs):
        dataset.read_into(spec, data[i, 0].numpy())
    lab = None
    if labels and all(v.has_variable(FAULTS) for v in dataset.volumes):
        lab = torch.stack(
            [torch.from_numpy(dataset.volumes[s.volume].read_variable(FAULTS, s.origin, crop)) for s in specs]
        )
    return Crops(data, lab, specs)


def eval_dataset(recipe: Recipe, volumes: list[Any]) -> CropDataset:
    """Crops as eval reads them: unflipped, normalised like training, one at a time, seeded by eval.seed."""
    data = recipe.data
    return CropDataset(
        volumes, crop=tuple(data.crop), micro_batch=1, seed=recipe.eval.seed, dp_rank=0, flips=False,  # type: ignore[arg-type]
        min_live_fraction=0.0, normalization=data.normalization, clip=data.clip,
    )  # fmt: skip


def heldout_crops(recipe: Recipe) -> torch.Tensor:
    """The recipe's eval.samples held-out crops, normalised (n, 1, cz, cy, cx): what periodic eval scores."""
    from seiscli.train.data import _volumes

    data = recipe.data
    volumes = _volumes(recipe)
    dataset = eval_dataset(recipe, volumes)
    specs = draw_specs(volumes, tuple(data.crop), data.holdout_fraction, recipe.eval.samples, recipe.eval.seed, True)  # type: ignore[arg-type]
    return read_crops(dataset, specs, labels=False).data


def eval_masks(plan: Plan, seed: int, first: int, count: int, slab: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, masked) of held-out samples first .. first+count-1: the trainer's masks at step 0 of eval.seed."""
    return batch_masks(plan, seed, 0, list(range(first, first + count)), slab)


def denormalize(pred: torch.Tensor, target_patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """A norm-pix prediction back in data units, with the true patch's mean and std (MAE's visualisation)."""
    if not norm_pix:
        return pred
    t = target_patches.float()
    mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
    return pred * (var + 1e-6) ** 0.5 + mean


@dataclass(frozen=True)
class Reconstruction:
    loss: float  # mean over masked patches of the per-patch MSE in the loss's space: the training loss
    psnr_db: float  # mean over crops of 10 log10(peak-to-peak^2 / MSE over masked voxels), in data units
    samples: int
    volume: torch.Tensor  # (n, cz, cy, cx) the crops with masked patches replaced by the prediction
    mask: torch.Tensor  # (n, cz, cy, cx) bool, True where masked


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoder3D, crops: torch.Tensor, plan: Plan, seed: int, batch: int = 4
) -> Reconstruction:
    """Masked-patch loss and PSNR of `model` on `crops` (one process, whole crops, fp32)."""
    p, device = model.patch_size, next(model.parameters()).device
    total, psnrs, volumes, masks = 0.0, [], [], []
    for first in range(0, crops.shape[0], batch):
        x = crops[first : first + batch]
        patches = patchify(x, p)
        keep, masked = eval_masks(plan, seed, first, x.shape[0])
        pd, kd, md = patches.to(device), keep.to(device), masked.to(device)
        total += float(model(pd, kd, md))
        pred = model.predict(pd, kd, md).float().cpu()
        target = patches.gather(1, masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        pred = denormalize(pred, target, model.norm_pix_loss)
        for i in range(x.shape[0]):
            mse = float(((pred[i] - target[i]) ** 2).mean())
            peak = float(x[i].max() - x[i].min())
            psnrs.append(10 * math.log10(peak**2 / mse) if mse > 0 and peak > 0 else float("inf"))
        filled = patches.clone()
        filled.scatter_(1, masked.unsqueeze(-1).expand(-1, -1, patches.shape[-1]), pred)
        flag = torch.zeros((*patches.shape[:2], 1), dtype=torch.float32)
        flag.scatter_(1, masked.unsqueeze(-1), 1.0)
        volumes.append(unpatchify(filled, x.shape[2:], p))
        masks.append(unpatchify(flag.expand(-1, -1, patches.shape[-1]), x.shape[2:], p) > 0.5)
    n = crops.shape[0]
    return Reconstruction(total / (n * plan.masked), float(np.mean(psnrs)), n, torch.cat(volumes), torch.cat(masks))


def unpatchify(patches: torch.Tensor, shape: tuple[int, ...], p: int) -> torch.Tensor:
    """(B, N, p^3) -> (B, Z, Y, X): `patchify` undone for one channel."""
    gz, gy, gx = (s // p for s in shape)
    v = patches.reshape(patches.shape[0], gz, gy, gx, p, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return v.reshape(patches.shape[0], gz * p, gy * p, gx * p)
