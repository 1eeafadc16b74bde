"""Stratified masking: exact lengths (research notes section 7.3) and deterministic, complete masks."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from seiscli.recipe import RecipeError, load_recipe
from seiscli.train.model import plan_for
from seiscli.train.model.masking import batch_masks, mix64, plan_lengths, slab_mask


@pytest.mark.parametrize(
    ("n", "p", "e", "v"),
    [
        (102_400, 1, 25_601, 25_600),
        (102_400, 2, 12_800, 25_599),
        (102_400, 4, 6_400, 25_599),
        (102_400, 8, 3_200, 25_599),
        (1_179_648, 8, 36_864, 294_911),
    ],
)
def test_worked_examples(n: int, p: int, e: int, v: int) -> None:
    plan = plan_lengths(n, Fraction(3, 4), p)
    assert (plan.encoder_per_slab, plan.visible, plan.slab_size) == (e, v, n // p)
    assert plan.encoder_tokens == v + 1


def test_effective_ratio_and_long_context_decoder_length() -> None:
    plan = plan_lengths(1_179_648, 0.75, 8)
    assert plan.slab_size == 147_456  # decoder tokens per rank
    assert float(plan.mask_ratio) == pytest.approx(0.7500008, abs=1e-7)
    assert plan_lengths(102_400, "0.75", 1).mask_ratio == Fraction(3, 4)


def test_tokens_that_do_not_split_are_rejected() -> None:
    with pytest.raises(ValueError, match="do not split over cp=3"):
        plan_lengths(102_400, 0.75, 3)


def test_no_visible_patch_is_rejected() -> None:
    with pytest.raises(ValueError, match="no visible patch"):
        plan_lengths(2, 0.9, 1)


def test_ties_go_to_more_masking() -> None:
    # t = 10 * 0.25 = 2.5: V = 2 and V = 3 are equally near; MAE would floor to 2 as well.
    assert plan_lengths(10, 0.75, 1).visible == 2


def test_recipe_plan_errors_name_the_fields() -> None:
    recipe = load_recipe("smoke", {"model.mask_ratio": 0.999})
    with pytest.raises(RecipeError, match=r"model\.mask_ratio=0\.999"):
        plan_for(recipe)


def _cases(n: int, seed: int) -> list[tuple[int, ...]]:
    """Random (a, b, numerator of r in 50ths, p) draws: hypothesis is not a dependency of this project."""
    rng = random.Random(seed)
    return [(rng.randint(1, 8), rng.randint(1, 12), rng.randint(1, 49), rng.randint(1, 8)) for _ in range(n)]


@pytest.mark.parametrize("case", _cases(300, 0))
def test_plan_properties(case: tuple[int, ...]) -> None:
    a, b, num, p = case
    grid, r = (a % 6 + 1, b % 6 + 1, (a * b) % 6 + 1), Fraction(num, 50)
    n = grid[0] * grid[1] * grid[2]
    if n % p:
        with pytest.raises(ValueError):
            plan_lengths(n, r, p)
        return
    try:
        plan = plan_lengths(n, r, p)
    except ValueError as e:
        assert "no visible patch" in str(e) or "too few visible patches" in str(e)
        return
    s, e, v = plan.slab_size, plan.encoder_per_slab, plan.visible
    assert s * p == n and 1 <= e <= s and v == e * p - 1 and (v + 1) % p == 0
    assert sum(plan.visible_in(c) for c in range(p)) == v
    assert sum(plan.masked_in(c) for c in range(p)) == n - v == plan.masked
    t = n * (1 - r)
    assert 2 * (t + 1) >= p  # otherwise refused above
    best = abs(e * p - 1 - t)
    assert all(abs(e2 * p - 1 - t) >= best for e2 in range(1, s + 1)), "a better E exists"


def test_slab_mask_is_deterministic_sorted_and_complete() -> None:
    keep, masked = slab_mask(7, 3, 5, 1, 100, 30)
    keep2, masked2 = slab_mask(7, 3, 5, 1, 100, 30)
    assert torch.equal(keep, keep2) and torch.equal(masked, masked2)
    assert keep.dtype == torch.int64 and len(keep) == 30 and len(masked) == 70
    assert torch.equal(keep, keep.sort().values) and torch.equal(masked, masked.sort().values)
    assert torch.equal(torch.cat([keep, masked]).sort().values, torch.arange(100))


@pytest.mark.parametrize("change", [(8, 3, 5, 1), (7, 4, 5, 1), (7, 3, 6, 1), (7, 3, 5, 2)])
def test_every_seed_part_changes_the_mask(change: tuple[int, int, int, int]) -> None:
    base, _ = slab_mask(7, 3, 5, 1, 1000, 250)
    other, _ = slab_mask(*change, 1000, 250)
    assert not torch.equal(base, other)


def test_mix64_depends_on_order_and_fits_a_generator_seed() -> None:
    assert mix64(1, 2) != mix64(2, 1)
    assert 0 <= mix64(-1, 2**70) < 2**64


def test_slabs_partition_the_sample() -> None:
    plan = plan_lengths(96, 0.75, 4)
    keeps, masks = [], []
    for c in range(plan.slabs):
        keep, masked = batch_masks(plan, 0, 11, [3, 4], c)
        assert keep.shape == (2, plan.visible_in(c)) and masked.shape == (2, plan.masked_in(c))
        keeps.append(keep + c * plan.slab_size)
        masks.append(masked + c * plan.slab_size)
    every = torch.cat(keeps + masks, dim=1).sort(dim=1).values
    assert torch.equal(every, torch.arange(96).expand(2, -1))
    assert torch.cat(keeps, dim=1).shape[1] == plan.visible
    assert plan.visible_in(0) == plan.encoder_per_slab - 1  # slab 0 also carries the cls token


def test_bad_slab_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        plan_lengths(96, 0.75, 4).visible_in(4)


# -- strata: the mask is a function of the sample, not of the CP degree -----------------------------------------


@pytest.mark.parametrize("p", [1, 2, 4, 5, 8])
def test_pretrain_crop_keeps_the_same_visible_count_at_every_cp(p: int) -> None:
    # 640 x 640 x 1024 at 16^3: 40 z planes, one stratum each; 25,600 + 1 is not a multiple of 40
    plan = plan_lengths(102_400, Fraction(3, 4), p, strata=40)
    assert (plan.visible, plan.encoder_tokens, plan.encoder_per_slab) == (25_599, 25_600, 25_600 // p)


def _global_masks(cp: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    over = {"parallelism.cp": cp, "data.crop": [64, 32, 32], "cluster.cpu_procs_per_node": 8}
    recipe = load_recipe("smoke", over)  # 8 z planes of 8^3 patches
    plan = plan_for(recipe)
    pairs = [batch_masks(plan, 5, 2, ids, c) for c in range(cp)]
    keep = torch.cat([k + c * plan.slab_size for c, (k, _) in enumerate(pairs)], dim=1)
    masked = torch.cat([m + c * plan.slab_size for c, (_, m) in enumerate(pairs)], dim=1)
    return keep, masked


def test_recipe_masks_are_the_same_for_every_cp_degree() -> None:
    keep1, masked1 = _global_masks(1, [0, 1, 7])
    for cp in (2, 4, 8):
        keep, masked = _global_masks(cp, [0, 1, 7])
        assert torch.equal(keep, keep1) and torch.equal(masked, masked1), cp
    assert keep1.shape == (3, 31)  # 128 tokens, target 32 visible: 31 + cls fills 8 strata of 4
    # each z plane (16 tokens) holds 4 encoder tokens: 3 visible patches + cls in plane 0, 4 in the others
    counts = torch.stack([((keep1 >= 16 * z) & (keep1 < 16 * (z + 1))).sum(1) for z in range(8)], dim=1)
    assert counts[:, 0].eq(3).all() and counts[:, 1:].eq(4).all()


@pytest.mark.parametrize("case", _cases(200, 1))
def test_stratified_plan_properties(case: tuple[int, ...]) -> None:
    gz, plane, num, p = case
    r = Fraction(num, 50)
    n = gz * plane
    if gz % p:
        with pytest.raises(ValueError):
            plan_lengths(n, r, p, strata=gz)
        return
    try:
        plan = plan_lengths(n, r, p, strata=gz)
    except ValueError as e:
        assert "no visible patch" in str(e) or "too few visible patches" in str(e)
        return
    one = plan_lengths(n, r, 1, strata=gz)
    assert plan.visible == one.visible and (plan.visible + 1) % gz == 0
    assert plan.encoder_per_slab * p == plan.visible + 1
    assert sum(plan.visible_in(c) for c in range(p)) == plan.visible
    keeps = [batch_masks(plan, 1, 0, [2], c)[0] + c * plan.slab_size for c in range(p)]
    assert torch.equal(torch.cat(keeps, dim=1), batch_masks(one, 1, 0, [2])[0])
