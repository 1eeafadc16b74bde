"""Heads of 64 vs heads of 128 at equal samples: held-out reconstruction and the fault probe (QUALITY.md).

Each (variant, seed) trains with `python -m seiscli.train` on one device from the same labelled volume (written
by `seis data synth`), then `python -m seiscli.train.eval` scores its last checkpoint. The model differs
only in the number of heads (encoder 256 wide: 4 heads of 64 or 2 of 128; decoder 128 wide: 2 of 64 or 1 of
128); the seed sets the initialisation, the crop stream and the masks. Prints a table, writes JSON to --out.
`--parallel N` trains N variants at once on the one device (the model is far too small to fill an H200, so
the runs are bound by their loaders; samples/s then says nothing about a run alone).

    python benchmarks/heads_quality.py --volume /tmp/vol.mdio --out results/ --steps 1500 --seeds 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from seiscli.recipe import load_recipe

VARIANTS = {"heads64": (4, 2), "heads128": (2, 1)}  # (encoder_heads, decoder_heads) at dims 256 / 128


def recipe_for(variant: str, seed: int, volume: str, steps: int, batch: int, device: str, workers: int) -> Any:
    enc, dec = VARIANTS[variant]
    return load_recipe(
        "smoke",
        {
            "name": f"quality-{variant}-s{seed}",
            "cluster.nodes": 1,
            "cluster.gpus_per_node": 1 if device == "cuda" else 0,
            "cluster.cpu_procs_per_node": 1,
            "model.patch_size": 8,
            "model.encoder_depth": 4,
            "model.encoder_dim": 256,
            "model.encoder_heads": enc,
            "model.decoder_depth": 2,
            "model.decoder_dim": 128,
            "model.decoder_heads": dec,
            "data.source": "mdio",
            "data.uris": [volume],
            "data.crop": [64, 64, 64],
            "data.holdout_fraction": 0.34,
            "data.workers": workers,
            "train.steps": steps,
            "train.micro_batch": batch,
            "train.seed": seed,
            "train.device": device,
            "train.precision": "bf16" if device == "cuda" else "fp32",
            "train.threads": None,
            "optim.lr": 1e-3,
            "optim.warmup_steps": max(1, steps // 20),
            "optim.weight_decay": 0.05,
            "checkpoint.interval": 0,
            "logging.interval": max(1, steps // 5),
            "eval.samples": 32,
        },
    )


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")


def one(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    recipe = recipe_for(variant, seed, args.volume, args.steps, args.batch, args.device, args.workers)
    run_dir = args.work / recipe.name
    if run_dir.exists():  # the trainer would resume its checkpoint: a lengthened run, not the one asked for
        sys.exit(f"{run_dir} exists (an earlier run's); remove it or pass another --work")
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    t0 = time.perf_counter()
    run([sys.executable, "-m", "seiscli.train", str(run_dir / "recipe.yaml"), "--run-dir", str(run_dir)],
        args.work / f"{recipe.name}.train.log")  # fmt: skip
    train_s = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    run([sys.executable, "-m", "seiscli.train.eval", "--run-dir", str(run_dir), "--json", "--device",
         args.device, "--probe-crops", str(args.probe_crops), "--probe-steps", str(args.probe_steps),
         "--out", str(run_dir / "eval")],
        args.work / f"{recipe.name}.eval.log")  # fmt: skip
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    probe = ev["probe"]
    row = {
        "variant": variant,
        "seed": seed,
        "samples": args.steps * args.batch,
        "final_train_loss": summary["final_loss"],
        "train_s": train_s,
        "samples_per_s": summary.get("samples_per_s"),
        "heldout_loss": ev["reconstruction"]["loss"],
        "psnr_db": ev["reconstruction"]["psnr_db"],
        "probe_iou": probe["trained"]["iou"],
        "probe_f1": probe["trained"]["f1"],
        "floor_iou": probe["random_encoder"]["iou"],
        "floor_f1": probe["random_encoder"]["f1"],
        "raw_iou": probe["raw_voxels"]["iou"],
        "fault_fraction_test": probe["fault_fraction_test"],
        "device": ev["device"],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volume", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/heads-quality"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--probe-crops", type=int, default=64)  # QUALITY.md's first figures (2026-12-02) used 16 / 100
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=6, help="loader workers per run")
    ap.add_argument("--parallel", type=int, default=1, help="runs trained at once on the device")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(variant, seed) for seed in args.seeds for variant in VARIANTS]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda job: one(args, *job), jobs))
    (args.out / "heads_quality.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out),
        "work": str(args.work)}, "rows": rows}, indent=2) + "\n")  # fmt: skip
    print("variant   seed  train_loss  heldout_loss  psnr_db  probe_iou  floor_iou  raw_iou  all_fault  samples/s")
    for r in rows:
        print(f"{r['variant']:9} {r['seed']:4}  {r['final_train_loss']:10.4f}  {r['heldout_loss']:12.4f}  "
              f"{r['psnr_db']:7.2f}  {r['probe_iou']:9.3f}  {r['floor_iou']:9.3f}  {r['raw_iou']:7.3f}  "
              f"{r['fault_fraction_test']:9.3f}  {r['samples_per_s'] or 0:9.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
