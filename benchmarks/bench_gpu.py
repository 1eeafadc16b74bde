"""GPU training throughput of a recipe's model through the product's own path, over a sweep of variants.

Each variant builds the recipe's model (`build_model`), the engine of `--strategy` (`build_engine`, as the
trainer does: ddp, zero1/2/3 through DeepSpeed, fsdp2) and the `Trainer`, and times real
`Trainer.train_step` calls (micro-batch masks, forward + backward under bf16 autocast, grad clipping, fused
AdamW, the per-step loss collective) on a random volume that a pinned host buffer feeds to the GPU each
step, as the real loader's last stage does. Rates use the median step time after warm-up; TFLOP/s and
MFU use seiscli.train.flops (model FLOPs, recompute not counted); memory is torch's peak allocation.

    python benchmarks/bench_gpu.py --out bench_gpu.json                 # one GPU, every variant
    torchrun --nproc-per-node 2 benchmarks/bench_gpu.py --variants ...  # DDP over 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_gpu.py --strategy zero2 --variants auto/none/1
    python benchmarks/bench_gpu.py --tiny                                # a few-second CPU check

A variant is attention/checkpointing/micro-batch[/option...], e.g. `auto/none/1`, `cudnn/save_attention/2`;
options: `compile` (parallelism.compile: torch.compile of each transformer block), `hd128` (head
dimension 128: fewer, wider heads), `crop=1024x1024x2048`. `reference/-/1` is the plain MAE of
reference_mae.py (no seiscli code) at the same size, timed with its own loop. Results of 2026-11-30:
BENCHMARKS.md and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_mae, when run from anywhere
import reference_mae

from seiscli.recipe import Recipe, load_recipe
from seiscli.train import distributed
from seiscli.train.flops import peak_flops, recipe_flops
from seiscli.train.model import build_model, plan_for
from seiscli.train.model.mae3d import _SeenKernels
from seiscli.train.parallel import ENGINES, build_engine
from seiscli.train.signals import StopRequest
from seiscli.train.trainer import Trainer, device_name

DEFAULT_VARIANTS = [
    "auto/none/1",
    "flash/none/1",
    "cudnn/save_attention/1",
    "cudnn/full/1",
    "cudnn/none/2",
    "reference/-/1",
    "efficient/none/1",
    "cudnn/save_attention/2",
    "cudnn/none/1/compile",
]
TINY_VARIANTS = ["auto/none/1", "math/full/2", "flash/save_attention/1", "reference/-/1", "auto/none/1/compile"]
TINY = {
    "data.crop": [32, 32, 64],
    "model.patch_size": 8,
    "model.encoder_depth": 2,
    "model.encoder_dim": 48,
    "model.encoder_heads": 2,
    "model.decoder_depth": 1,
    "model.decoder_dim": 24,
    "model.decoder_heads": 2,
}


def variant_recipe(base: str, variant: str, world: int, tiny: bool, strategy: str = "ddp") -> Recipe:
    attention, ac, mb, *opts = variant.split("/")
    overrides: dict[str, Any] = {
        "cluster.nodes": 1,
        "cluster.gpus_per_node": world,
        "cluster.cpu_procs_per_node": world,
        "parallelism.strategy": strategy,
        "parallelism.cp": 1,
        "train.micro_batch": int(mb),
        "train.grad_accum": 1,
        "train.global_batch": None,
    }
    if attention != "reference":
        overrides |= {"model.attention": attention, "parallelism.activation_checkpointing": ac}
    overrides |= TINY if tiny else {}
    for opt in opts:
        if opt.startswith("hd"):  # head dimension: fewer, wider heads at the same model width
            m = load_recipe(base, overrides).model
            hd = int(opt[2:])
            overrides |= {"model.encoder_heads": m.encoder_dim // hd, "model.decoder_heads": m.decoder_dim // hd}
        elif opt.startswith("crop="):
            overrides["data.crop"] = [int(c) for c in opt[5:].split("x")]
        elif opt == "compile":
            overrides["parallelism.compile"] = True  # build_model compiles each block (compile_blocks)
        else:
            raise ValueError(f"variant option {opt!r}; allowed: compile, hdN, crop=ZxYxX")
    return load_recipe(base, overrides)


def random_batches(recipe: Recipe, device: torch.device) -> Iterator[torch.Tensor]:
    """Random normal volumes (never zeros: they run faster than data), copied from pinned memory each step."""
    host = torch.randn(recipe.train.micro_batch, recipe.model.in_chans, *recipe.data.crop)
    if device.type == "cuda":
        host = host.pin_memory()
    while True:
        yield host.to(device, non_blocking=True)


def cuda_median_s(fn: Any, reps: int = 10) -> float:
    """Median seconds of `fn` over `reps` runs after one warm-up run, CUDA events around each run."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _sdpa_fwd_bwd(backend: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)


def ceilings(device: torch.device) -> dict[str, float]:
    """TFLOP/s of a bf16 8192^3 matmul and of SDPA forward + backward at this model's attention shapes
    (counted as 3 x forward, the MFU convention), on random data, median of CUDA-event timings."""

    out: dict[str, float] = {}
    x, y = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    out["matmul_8192"] = 2 * 8192**3 / cuda_median_s(lambda: x @ y) / 1e12
    from torch.nn.attention import SDPBackend

    shapes = [("enc", 16, 25_601, 64), ("dec", 8, 102_400, 64), ("enc_hd128", 8, 25_601, 128)]
    for name, heads, seq, hd in [*shapes, ("dec_hd128", 4, 102_400, 128)]:
        q, k, v = (torch.randn(1, heads, seq, hd, device=device, dtype=torch.bfloat16) for _ in "qkv")
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        g = torch.randn_like(q)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            key = f"sdpa_{name}_{backend.name.split('_')[0].lower()}"
            try:
                t = cuda_median_s(functools.partial(_sdpa_fwd_bwd, backend, q, k, v, g), 5)
                out[key] = 3 * 4 * seq * seq * heads * hd / t / 1e12
            except RuntimeError as e:
                out[key] = float("nan")
                print(f"{key}: {e}", file=sys.stderr)
    return out


def run_product(recipe: Recipe, env: distributed.DistEnv, compiled: bool, steps: int, warmup: int) -> dict:
    plan = plan_for(recipe)
    flops = recipe_flops(recipe, plan)
    model = build_model(recipe, env.device)
    engine = build_engine(model, recipe, env)
    trainer = Trainer(recipe, env, engine, random_batches(recipe, env.device), plan, flops, Path("/nonexistent"))
    resolved = model.attention_kernel(env.device)
    batches = iter(trainer.loader)
    model.train()
    records, seen = [], []
    with StopRequest() as stop:
        for step in range(warmup + steps):
            if step == 0 and not compiled:
                with _SeenKernels() as mode:  # which attention kernels the first step really ran
                    records.append(trainer.train_step(batches, step, stop)[0])
                seen = sorted(set(mode.seen))
            else:
                records.append(trainer.train_step(batches, step, stop)[0])
    timed = records[warmup:]
    dt = statistics.median(r["step_time_s"] for r in timed)
    return {
        "step_time_s": dt,
        "step_times_s": [r["step_time_s"] for r in records],
        "data_wait_s": statistics.median(r["data_wait_s"] for r in timed),
        "loss_first_last": [records[0]["loss"], records[-1]["loss"]],
        "max_mem_gb": timed[-1].get("max_mem_gb"),
        "attention_resolved": resolved,
        "attention_ran": "+".join(seen) if seen else ("math" if not compiled else "?"),
        "train_flops_per_sample": flops.train,
        "attention_flops_share": flops.attention_share,
        "global_batch": trainer.global_batch,
    }


def run_reference(recipe: Recipe, device: torch.device, steps: int, warmup: int) -> dict:
    m = recipe.model
    kw = dict(patch=m.patch_size, in_chans=m.in_chans, embed_dim=m.encoder_dim, depth=m.encoder_depth)
    kw |= dict(heads=m.encoder_heads, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth)
    kw |= dict(decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss)
    r = reference_mae.time_training(tuple(recipe.data.crop), recipe.train.micro_batch, steps, warmup, device, **kw)
    # Which kernel PyTorch's default SDPA choice runs for the reference's heads (its layout, bf16).
    ran = []
    for dim, heads in ((m.encoder_dim, m.encoder_heads), (m.decoder_dim, m.decoder_heads)):
        attn = reference_mae.Attention(dim, heads).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16), _SeenKernels() as mode:
            attn(torch.randn(1, 128, dim, device=device))
        name = mode.seen[0] if mode.seen else "math"
        ran += [] if name in ran else [name]
    r["attention_ran"] = "+".join(ran)
    plan = plan_for(recipe)
    # Rated with the product's model-FLOPs count of the same task, so samples/s and MFU compare directly.
    return {**r, "train_flops_per_sample": recipe_flops(recipe, plan).train, "global_batch": recipe.train.micro_batch}


def measure(variant: str, args: argparse.Namespace, env: distributed.DistEnv | None) -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    recipe = variant_recipe(args.recipe, variant, world, args.tiny, args.strategy)
    attention, ac, mb = variant.split("/")[:3]
    row: dict[str, Any] = {"variant": variant, "strategy": args.strategy, "attention": attention}
    row |= {"checkpointing": ac, "micro_batch": int(mb)}
    row["compile"] = "compile" in variant.split("/")[3:]
    row["tokens_per_sample"] = recipe.num_tokens
    device = env.device if env else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    try:
        if attention == "reference":
            if world > 1:
                raise ValueError("the reference runs on one process only")
            row |= run_reference(recipe, device, args.steps, args.warmup)
        else:
            assert env is not None
            row |= run_product(recipe, env, row["compile"], args.steps, args.warmup)
    except torch.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e).splitlines()[0]}"
    except Exception as e:  # one broken variant must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    row["wall_s"] = time.perf_counter() - t0
    if "step_time_s" in row:
        sps = row["global_batch"] / row["step_time_s"]
        row["samples_per_s"] = sps
        row["tokens_per_s"] = sps * recipe.num_tokens
        row["tflops_per_gpu"] = row["train_flops_per_sample"] * sps / world / 1e12
        peak = peak_flops(device_name(device)) if device.type == "cuda" else None
        if peak:
            row["mfu"] = row["tflops_per_gpu"] * 1e12 / peak
    if device.type == "cuda":
        row["max_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    head = "| variant | attention ran | s/step | samples/s | TFLOP/s | MFU | peak GiB |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error'][:70]} | | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        mem = f"{r['max_mem_gb']:.1f}" if r.get("max_mem_gb") is not None else "-"
        ran = r.get("attention_ran", "default")
        lines.append(
            f"| {r['variant']} | {ran} | {r['step_time_s']:.3f} | {r['samples_per_s']:.3f} | "
            f"{r['tflops_per_gpu']:.0f} | {mfu} | {mem} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="pretrain")
    ap.add_argument("--strategy", default="ddp", choices=sorted(ENGINES), help="parallelism.strategy")
    ap.add_argument("--variants", nargs="*", help="default: the full sweep (see the module docstring)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; variants not started by then skip")
    ap.add_argument("--tiny", action="store_true", help="a small model and crop on CPU: checks the script")
    ap.add_argument("--ceilings", action="store_true", help="also time a bf16 matmul and the attention kernels")
    ap.add_argument("--out", type=Path, help="write every number as JSON here (rewritten after each variant)")
    args = ap.parse_args()
    variants = args.variants or (TINY_VARIANTS if args.tiny else DEFAULT_VARIANTS)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for v in variants:  # a typo fails here, before any GPU time is spent
        variant_recipe(args.recipe, v, world, args.tiny, args.strategy)
    env = distributed.setup(variant_recipe(args.recipe, "auto/none/1", world, args.tiny, args.strategy))
    info = {
        "recipe": args.recipe,
        "world_size": world,
        "strategy": args.strategy,
        "device": device_name(env.device),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if env.device.type == "cuda" else None,
        "steps": args.steps,
        "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if args.ceilings and env.device.type == "cuda":
        info["ceilings_tflops"] = ceilings(env.device)
    if env.is_main:
        print(json.dumps(info), flush=True)
    start, rows = time.perf_counter(), []
    for v in variants:
        if time.perf_counter() - start > args.time_budget:
            rows.append({"variant": v, "error": "skipped: time budget"})
            continue
        row = measure(v, args, env)
        rows.append(row)
        if env.is_main:
            print(json.dumps({k: val for k, val in row.items() if k != "step_times_s"}), flush=True)
            if args.out:
                args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    if env.is_main:
        print(table(rows), flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
