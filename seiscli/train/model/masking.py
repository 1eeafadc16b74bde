"""Stratified MAE masking with exact arithmetic (research notes section 7.3).

A sample's N tokens (flat C-order ids over the (z, y, x) patch grid) are cut into K contiguous z-strata of
N / K tokens. Every stratum keeps T encoder tokens: stratum 0 holds the cls token plus T - 1 visible
patches, the others T visible patches, so V = T*K - 1 patches are visible in total. T is the integer that
brings V nearest to N*(1 - r) (ties go to more masking); facebookresearch/mae floors instead. Each stratum's
ids come from a CPU generator seeded from (seed, step, sample id, stratum), so every rank, device and a
single-process reference draw the same ids without communicating.

Context parallelism cuts the sample into P contiguous slabs, one per rank; a slab is K / P whole strata, so
every rank's encoder sequence has the same length E = T*K/P (ring attention needs that). The trainer takes
K = the z patch count, which every allowed P divides: the mask of a sample, hence the loss, is then the same
for every CP degree (cp=1 and cp=P train on the same masks). K defaults to P (one stratum per slab), which
makes the mask depend on P.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from seiscli.recipe import tokens_per_stratum

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Plan:
    """Token counts of one sample: N tokens in P slabs of S, K strata of T encoder tokens; V visible in all."""

    n_tokens: int
    slabs: int
    slab_size: int
    encoder_per_slab: int
    visible: int
    strata: int = 0  # 0: one stratum per slab

    @property
    def strata_count(self) -> int:
        return self.strata or self.slabs

    @property
    def stratum_size(self) -> int:
        return self.n_tokens // self.strata_count

    @property
    def encoder_per_stratum(self) -> int:
        return (self.visible + 1) // self.strata_count

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


def plan_lengths(n_tokens: int, mask_ratio: Fraction | float | str, slabs: int = 1, strata: int | None = None) -> Plan:
    """Choose T (encoder tokens per stratum) so that V = T*K - 1 is nearest to N*(1 - r), exactly.
    strata: K, a multiple of slabs that divides N (default: slabs)."""
    r = mask_ratio if isinstance(mask_ratio, Fraction) else Fraction(str(mask_ratio))
    if not 0 < r < 1:
        raise ValueError(f"mask ratio {r} is outside (0, 1)")
    if n_tokens < 1 or slabs < 1:
        raise ValueError(f"need at least one token and one slab, got N={n_tokens}, P={slabs}")
    if n_tokens % slabs:
        raise ValueError(f"{n_tokens} tokens do not split over cp={slabs}")
    k = slabs if strata is None else strata
    if k < 1 or k % slabs or n_tokens % k:
        raise ValueError(f"{k} mask strata do not split over cp={slabs} or do not divide {n_tokens} tokens")
    t = tokens_per_stratum(n_tokens, r, k)
    v = t * k - 1
    if v < 1:
        raise ValueError(f"mask ratio {float(r)} leaves no visible patch out of {n_tokens}")
    e = t * (k // slabs)
    return Plan(n_tokens, slabs, n_tokens // slabs, e, v, 0 if strata is None else k)


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
    seed: int, step: int, sample_id: int, stratum: int, size: int, n_visible: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted local (keep, masked) ids of one stratum of a sample; int64 CPU tensors of n_visible and the rest.
    The seed names the stratum, never the slab: the ids do not depend on how the sample is split over ranks."""
    g = torch.Generator(device="cpu").manual_seed(mix64(seed, step, sample_id, stratum))
    perm = torch.randperm(size, generator=g)
    return perm[:n_visible].sort().values, perm[n_visible:].sort().values


def sample_mask(plan: Plan, seed: int, step: int, sample_id: int, slab: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted slab-local (keep, masked) ids of one sample's slab: the slab's strata, each shifted to its place."""
    plan._check_slab(slab)
    per_slab = plan.strata_count // plan.slabs
    size, t = plan.stratum_size, plan.encoder_per_stratum
    keeps, masks = [], []
    for j in range(per_slab):
        k = slab * per_slab + j
        keep, masked = slab_mask(seed, step, sample_id, k, size, t - (k == 0))
        keeps.append(keep + j * size)
        masks.append(masked + j * size)
    return torch.cat(keeps), torch.cat(masks)


def batch_masks(
    plan: Plan, seed: int, step: int, sample_ids: Sequence[int], slab: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, masked) slab-local ids for a micro-batch: int64 CPU tensors (B, v_slab) and (B, m_slab)."""
    pairs = [sample_mask(plan, seed, step, i, slab) for i in sample_ids]
    return torch.stack([k for k, _ in pairs]), torch.stack([m for _, m in pairs])
