"""Context parallelism: a sample split over a cp group equals the same sample in one process.

The cp run splits the token grid into slabs (one per rank) and attends across them with ring attention;
the reference runs the whole sample in one process with the same visible/masked ids (every slab's ids
shifted to global positions). Attention does not care about token order, so the summed loss and the
summed gradients must agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seiscli.recipe import load_recipe
from seiscli.train.model import MaskedAutoencoder3D, batch_masks, patchify, plan_lengths
from tests.distributed import run_distributed

GRID = (4, 2, 2)  # 16 tokens of 4^3
PATCH = 4


def _model() -> MaskedAutoencoder3D:
    torch.manual_seed(0)
    return MaskedAutoencoder3D(
        grid=GRID,
        patch_size=PATCH,
        encoder_depth=2,
        encoder_dim=24,
        encoder_heads=2,
        decoder_depth=1,
        decoder_dim=12,
        decoder_heads=2,
        norm_pix_loss=True,
    ).double()


def _inputs(cp: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], int]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, GRID[0] * PATCH, GRID[1] * PATCH, GRID[2] * PATCH, generator=g, dtype=torch.float64)
    plan = plan_lengths(16, Fraction(3, 4), cp)
    masks = [batch_masks(plan, seed=7, step=3, sample_ids=[0, 1], slab=c) for c in range(cp)]
    return patchify(x, PATCH), masks, plan.slab_size


def _cp_worker(rank: int, ws: int, out: str) -> None:
    model = _model()
    model.set_context_parallel(dist.group.WORLD, "math")
    patches, masks, s = _inputs(ws)
    keep, masked = masks[rank]
    loss = model(patches[:, rank * s : (rank + 1) * s], keep, masked, offset=rank * s, with_cls=rank == 0)
    loss.backward()
    dist.all_reduce(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for gr in grads.values():
        dist.all_reduce(gr)
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_equals_single_process(cp: int, tmp_path: Path) -> None:
    out = str(tmp_path / "cp.pt")
    run_distributed(_cp_worker, cp, out)
    got = torch.load(out)

    model = _model()
    patches, masks, s = _inputs(cp)
    keep = torch.cat([k + c * s for c, (k, _) in enumerate(masks)], dim=1)
    masked = torch.cat([m + c * s for c, (_, m) in enumerate(masks)], dim=1)
    ref = model(patches, keep, masked)
    ref.backward()

    torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-10, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.slow
def test_smoke_trains_with_cp2(tmp_path: Path) -> None:
    recipe = load_recipe("smoke", {"parallelism.cp": 2, "train.steps": 4})
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*env_cmd, "-m", "seiscli.train", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["world_size"] == 2 and r["loss"] == r["loss"] for r in steps)


def _train(tmp: Path, cp: int, steps: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The smoke recipe trained by the real entry point on `cp` processes (one cp group, data-parallel size 1)."""
    over = {"parallelism.cp": cp, "cluster.cpu_procs_per_node": cp, "train.steps": steps, "train.micro_batch": 2}
    recipe = load_recipe("smoke", {**over, "model.attention": "math", "optim.warmup_steps": 1})
    path = tmp / f"cp{cp}.yaml"
    path.write_text(recipe.to_yaml())
    run = tmp / f"run-cp{cp}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"]
    done = subprocess.run([*cmd, "-m", "seiscli.train", str(path), "--run-dir", str(run)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(next(run.glob("checkpoints/step-*/engine/model_optim.pt")), weights_only=True)
    return [r for r in recs if "step" in r], state["model"]


@pytest.mark.slow
def test_cp1_and_cp2_train_the_same_model(tmp_path: Path) -> None:
    """Same data, seed and masks: one process (cp=1) and a cp=2 group give the same losses, gradient norms and
    parameters after two steps, within float error (SDPA in one process, ring attention over two)."""
    one, params1 = _train(tmp_path, 1, 2)
    two, params2 = _train(tmp_path, 2, 2)
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert params1.keys() == params2.keys()
    for name, p in params1.items():
        q = params2[name]
        if name.endswith("attn.qkv.bias"):  # the key bias has a zero gradient (softmax ignores a shift of all
            d = p.numel() // 3  # keys); Adam scales its float noise to +-lr, so only q and v biases are compared
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
