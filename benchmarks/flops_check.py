"""The analytic training FLOPs (seiscli/train/flops.py) against torch's FlopCounterMode on one real step.

    python benchmarks/flops_check.py [RECIPE ...]     (default: smoke pretrain pretrain-long-context)

The step (forward + backward of one sample, the recipe's model and mask plan) runs on the meta device, so
the pretrain models are counted at full size in seconds without allocating their activations. Attention is
counted with the model-FLOPs convention (backward = 2 x forward, no recompute), as MFU is.
"""

from __future__ import annotations

import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from seiscli.recipe import load_recipe
from seiscli.train.flops import recipe_flops
from seiscli.train.model import batch_masks, build_model, plan_for

aten = torch.ops.aten


def _fwd(q: torch.Size, k: torch.Size, v: torch.Size, *a: object, **kw: object) -> int:
    return sdpa_flop_count(q, k, v)


def _bwd(dout: torch.Size, q: torch.Size, k: torch.Size, v: torch.Size, *a: object, **kw: object) -> int:
    return 2 * sdpa_flop_count(q, k, v)


# FlopCounterMode maps the CUDA SDPA ops; the CPU/meta flash op needs the same formula.
MAPPING = {
    aten._scaled_dot_product_flash_attention_for_cpu: _fwd,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _bwd,
}


def count(name: str) -> tuple[int, int, float]:
    # One process holds the whole sample: a context-parallel recipe is counted with cp=1 (its per-sample
    # FLOPs do not depend on the degree, see flops.py). Recompute is not model FLOPs: no checkpointing.
    # The flash kernel is the op MAPPING counts.
    fixed = {"parallelism.cp": 1, "cluster.nodes": 1, "parallelism.activation_checkpointing": False}
    recipe = load_recipe(name, {**fixed, "model.attention": "flash"})
    m, plan = recipe.model, plan_for(recipe)
    meta = torch.device("meta")
    with meta:
        model = build_model(recipe, meta)
        patches = torch.empty(1, plan.n_tokens, m.in_chans * m.patch_size**3)
    keep, masked = batch_masks(plan, 0, 0, [0])
    counter = FlopCounterMode(display=False, custom_mapping=MAPPING)
    with counter:
        model(patches, keep.to("meta"), masked.to("meta")).backward()
    return recipe_flops(recipe, plan).train, counter.get_total_flops(), plan.n_tokens


def main(names: list[str]) -> None:
    print(f"{'recipe':<24}{'tokens':>10}{'analytic':>12}{'counted':>12}{'ratio':>8}{'secs':>7}")
    for name in names:
        t = time.perf_counter()
        analytic, counted, tokens = count(name)
        dt = time.perf_counter() - t
        print(f"{name:<24}{tokens:>10,}{analytic:>12.4g}{counted:>12.4g}{counted / analytic:>8.4f}{dt:>7.1f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["smoke", "pretrain", "pretrain-long-context"])
