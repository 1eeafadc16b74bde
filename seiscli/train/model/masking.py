"""Slab-stratified MAE masking with exact arithmetic (research notes section 7.3).

A sample's N tokens (flat C-order ids over the (z, y, x) patch grid) are cut into P contiguous slabs of
S = N / P tokens, one per context-parallel rank (P = 1 without context parallelism). Every slab keeps
E encoder tokens: slab 0 holds the cls token plus E - 1 visible patches, the others E visible patches, so
V = E*P - 1 patches are visible in total and every rank's encoder sequence has the same length. E is the
integer that brings V nearest to N*(1 - r) (ties go to more masking); facebookresearch/mae floors instead.
Masks come from a CPU generator seeded from (seed, step, sample id, slab), so every rank, device and a
single-process reference draw the same ids without communicating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from math import floor

import torch

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Plan:
    """Token counts of one sample: N tokens in P slabs of S; E encoder tokens per slab; V visible in all."""

    n_tokens: int
    slabs: int
    slab_size: int
    encoder_per_slab: int
    visible: int

    @property
    def masked(self) -> int:
        return self.n_tokens - self.visible

    @property
    def encoder_tokens(self) -> int:
        """Encoder sequence length of the whole sample: visible patches plus the cls token."""
        return self.encoder_per_slab * self.slabs

    @property
    def mask_ratio(self) -> Fraction:
        """The ratio actually used, which may differ slightly from the recipe's (see module docstring)."""
        return 1 - Fraction(self.visible, self.n_tokens)

    def visible_in(self, slab: int) -> int:
        self._check_slab(slab)
        return self.encoder_per_slab - (slab == 0)

    def masked_in(self, slab: int) -> int:
        return self.slab_size - self.visible_in(slab)

    def _check_slab(self, slab: int) -> None:
        if not 0 <= slab < self.slabs:
            raise ValueError(f"slab {slab} is outside 0..{self.slabs - 1}")


def plan_lengths(n_tokens: int, mask_ratio: Fraction | float | str, slabs: int = 1) -> Plan:
    """Choose E (encoder tokens per slab) so that V = E*P - 1 is nearest to N*(1 - r), exactly."""
    r = mask_ratio if isinstance(mask_ratio, Fraction) else Fraction(str(mask_ratio))
    if not 0 < r < 1:
        raise ValueError(f"mask ratio {r} is outside (0, 1)")
    if n_tokens < 1 or slabs < 1:
        raise ValueError(f"need at least one token and one slab, got N={n_tokens}, P={slabs}")
    if n_tokens % slabs:
        raise ValueError(f"{n_tokens} tokens do not split over cp={slabs}")
    s = n_tokens // slabs
    target = n_tokens * (1 - r)
    lo = floor((target + 1) / slabs)
    candidates = {min(max(e, 1), s) for e in (lo, lo + 1)}
    e = min(candidates, key=lambda e: (abs(e * slabs - 1 - target), e))
    v = e * slabs - 1
    if v < 1:
        raise ValueError(f"mask ratio {float(r)} leaves no visible patch out of {n_tokens}")
    return Plan(n_tokens=n_tokens, slabs=slabs, slab_size=s, encoder_per_slab=e, visible=v)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def mix64(*parts: int) -> int:
    """A well-spread 64-bit seed from several integers (order matters)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (p & _U64))
    return h


def slab_mask(
    seed: int, step: int, sample_id: int, slab: int, slab_size: int, n_visible: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted slab-local (keep, masked) ids of one sample's slab; int64 CPU tensors of n_visible and the rest."""
    g = torch.Generator(device="cpu").manual_seed(mix64(seed, step, sample_id, slab))
    perm = torch.randperm(slab_size, generator=g)
    return perm[:n_visible].sort().values, perm[n_visible:].sort().values


def batch_masks(
    plan: Plan, seed: int, step: int, sample_ids: Sequence[int], slab: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, masked) slab-local ids for a micro-batch: int64 CPU tensors (B, v_slab) and (B, m_slab)."""
    v = plan.visible_in(slab)
    pairs = [slab_mask(seed, step, i, slab, plan.slab_size, v) for i in sample_ids]
    return torch.stack([k for k, _ in pairs]), torch.stack([m for _, m in pairs])
