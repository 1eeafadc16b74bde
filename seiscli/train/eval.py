"""`python -m seiscli.train.eval --run-dir DIR`: score one checkpoint on one process (what `seis eval` runs).

Any strategy and world size loads here: DDP's replica and FSDP2's DCP shards through their engines' own
load (FSDP2 reshards to one process), ZeRO's partitions through DeepSpeed's consolidation of the fp32
master weights. The model is then evaluated in fp32 on the CPU or one GPU:
1. held-out reconstruction (seiscli/train/heldout.py): masked-patch loss and PSNR;
2. the fault-segmentation linear probe (seiscli/train/probe.py), trained encoder vs a random one;
3. PNGs of one held-out crop for each.

Exit codes: 0 done; 2 a bad argument, recipe, checkpoint or volume (one line on stderr); 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from seiscli.checkpoint_layout import find_latest, read_manifest, resolve_dir, step_name
from seiscli.recipe import Recipe, RecipeError, load_recipe, validate
from seiscli.train.errors import CheckpointError

PROG = "python -m seiscli.train.eval"
EVAL_DIR = "eval"
SPLIT_WITHOUT_HOLDOUT = (
    0.5  # --data volumes of a recipe without a held-out region: probe on one half, test on the other
)


class EvalError(ValueError):
    """Something the user can fix: one line."""


def find_checkpoint(run_dir: Path, which: str | None) -> tuple[Path, dict[str, Any]]:
    """The checkpoint directory and manifest: `which` (step-N or N) or the newest complete one."""
    recipe_file = run_dir / "recipe.yaml"
    root = resolve_dir(load_recipe(str(recipe_file)), run_dir) if recipe_file.is_file() else run_dir / "checkpoints"
    if which is None:
        found = find_latest(root)
        if found is None:
            raise EvalError(f"no complete checkpoint under {root}; train with checkpoint.interval > 0 or to the end")
        return found.path, found.manifest
    digits = which.removeprefix("step-")
    if not digits.isdigit():
        raise EvalError(f"--checkpoint {which!r}: allowed step-N or N (a step number), e.g. step-000100")
    path = root / step_name(int(digits))
    try:
        return path, read_manifest(path)
    except ValueError as e:
        have = ", ".join(p.name for p in sorted(root.glob("step-*")) if p.is_dir()) or "none"
        raise EvalError(f"--checkpoint {which}: {path} is not a complete checkpoint ({e}); present: {have}") from None


def single_process_recipe(manifest: dict[str, Any], device: str, data: list[str]) -> Recipe:
    """The checkpoint's recipe, run as one process without context parallelism (its model unchanged)."""
    d = json.loads(json.dumps(manifest["recipe"]))
    d["cluster"].update(nodes=1, gpus_per_node=1 if device == "cuda" else 0, cpu_procs_per_node=1)
    d["parallelism"].update(cp=1, fsdp_shard_size=None, compile=False, activation_checkpointing="none")
    d["train"].update(global_batch=None, device=device, precision="fp32")
    if data:
        d["data"].update(source="mdio", uris=list(data))
    return validate(d)


def load_model(path: Path, manifest: dict[str, Any], recipe: Recipe, device: Any) -> Any:
    """The checkpoint's model as a plain fp32 module on `device`, whatever strategy and world size saved it."""
    import torch

    from seiscli.train.distributed import DistEnv
    from seiscli.train.model import build_model
    from seiscli.train.parallel import build_engine

    model = build_model(recipe, device)
    if str(manifest.get("strategy", "")).startswith("zero"):
        # All ranks' fp32 partitions, merged (DeepSpeed's zero_to_fp32): stages 1-3, any dp size, no process group.
        # DeepSpeed logs to stdout (its handler is made at import): sent to stderr, so --json stays parseable.
        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from seiscli.train.parallel.deepspeed_zero import TAG

            state = get_fp32_state_dict_from_zero_checkpoint(str(path / "engine"), tag=TAG)
        model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    else:
        env = DistEnv(0, 1, 0, "single", device, cp=1)
        build_engine(model, recipe, env).load(path / "engine")  # DDP's replica; FSDP2's DCP resharded to 1
    return model.eval()


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from seiscli.train import heldout, probe
    from seiscli.train.data import _volumes
    from seiscli.train.distributed import choose_device
    from seiscli.train.model import build_model, plan_for

    t0 = time.perf_counter()
    path, manifest = find_checkpoint(args.run_dir, args.checkpoint)
    device_kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    recipe = single_process_recipe(manifest, device_kind, args.data or [])
    if args.seed is not None:  # another draw of crops, masks and random encoder: how much of a number is noise
        recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"seed": args.seed})})
    device = choose_device(recipe, 0)
    torch.manual_seed(recipe.eval.seed)
    fraction = recipe.data.holdout_fraction
    if not fraction:
        if not args.data:
            raise EvalError(
                "the run's recipe reserves no held-out region (data.holdout_fraction=0), so every inline may have "
                "been trained on; pass --data URI of volumes training never read, or train with a fraction > 0"
            )
        fraction = SPLIT_WITHOUT_HOLDOUT
    model = load_model(path, manifest, recipe, device)
    data = recipe.data
    volumes = _volumes(recipe)
    dataset = heldout.eval_dataset(recipe, volumes)
    crop, seed = tuple(data.crop), recipe.eval.seed
    samples = args.samples or recipe.eval.samples
    probe_crops = recipe.eval.probe_crops if args.probe_crops is None else args.probe_crops
    probe_steps = args.probe_steps or recipe.eval.probe_steps
    held = heldout.read_crops(dataset, heldout.draw_specs(volumes, crop, fraction, samples, seed, True), False)  # type: ignore[arg-type]
    rec = heldout.reconstruct(model, held.data, plan_for(recipe), seed)
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "step": int(manifest["step"]),
        "strategy": manifest.get("strategy"),
        "saved_world_size": manifest.get("world_size"),
        "device": str(device),
        "volumes": [v.uri for v in volumes],
        "holdout_fraction": fraction,
        "eval_seed": seed,
        "reconstruction": {"loss": rec.loss, "psnr_db": rec.psnr_db, "samples": rec.samples},
    }
    out_dir = args.out or args.run_dir / EVAL_DIR / step_name(int(manifest["step"]))
    pictures: list[str] = []
    if not args.no_pictures:
        from seiscli.train.eval_pictures import probe_png, reconstruction_png

        title = f"{path.name}: held-out crop 0, masked-patch loss {rec.loss:.3f}, PSNR {rec.psnr_db:.1f} dB (all crops)"
        png = reconstruction_png(out_dir / "reconstruction.png", held.data[0, 0], rec.mask[0], rec.volume[0], title)
        pictures.append(str(png))
    if probe_crops:
        train = heldout.read_crops(dataset, heldout.draw_specs(volumes, crop, fraction, probe_crops, seed, False), True)  # type: ignore[arg-type]
        test = heldout.read_crops(dataset, heldout.draw_specs(volumes, crop, fraction, probe_crops, seed, True), True)  # type: ignore[arg-type]
        if train.labels is None or test.labels is None:
            result["probe"] = None
            print(f"{PROG}: note: no fault_mask in the volumes; the fault probe is skipped", file=sys.stderr)
        else:
            floor_model = build_model(recipe, device).eval()  # the same architecture at its initialisation
            runs = {
                "trained": lambda c: probe.token_features(model, c),
                "random_encoder": lambda c: probe.token_features(floor_model, c),
                "raw_voxels": lambda c: probe.voxel_features(c.to(device), recipe.model.patch_size),
            }
            kw = {"steps": probe_steps, "seed": seed}
            got = {
                k: probe.run_probe(f, train.data, train.labels, test.data, test.labels, **kw) for k, f in runs.items()
            }
            mine, floor, raw = got["trained"], got["random_encoder"], got["raw_voxels"]
            result["probe"] = {
                "crops": probe_crops,
                "steps": probe_steps,
                "fault_fraction_test": float(test.labels.float().mean()),
                "trained": {"iou": mine.iou, "f1": mine.f1, "threshold": mine.threshold, "train_f1": mine.train_f1},
                "random_encoder": {"iou": floor.iou, "f1": floor.f1, "threshold": floor.threshold},
                "raw_voxels": {"iou": raw.iou, "f1": raw.f1, "threshold": raw.threshold},
            }
            if not args.no_pictures:
                title = f"{path.name}: fault probe IoU {mine.iou:.3f} (random encoder {floor.iou:.3f}), held-out crop 0"
                png = probe_png(
                    out_dir / "probe.png",
                    test.data[0, 0],
                    test.labels[0],
                    mine.probability[0],
                    floor.probability[0],
                    title,
                )
                pictures.append(str(png))
    result["pictures"] = pictures
    result["eval_time_s"] = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(out_dir / "eval.json")
    return result


def report(r: dict[str, Any]) -> str:
    rec = r["reconstruction"]
    lines = [
        f"checkpoint {r['checkpoint']} (step {r['step']}, {r['strategy']} on {r['saved_world_size']} processes), "
        f"evaluated on {r['device']}",
        f"held-out reconstruction: masked-patch loss {rec['loss']:.4f}, PSNR {rec['psnr_db']:.2f} dB "
        f"({rec['samples']} crops from the last {r['holdout_fraction']:.0%} of inlines, eval seed {r['eval_seed']})",
    ]
    p = r.get("probe")
    if p:
        t, f = p["trained"], p["random_encoder"]
        lines.append(
            f"fault probe on {p['crops']} held-out crops: IoU {t['iou']:.3f} F1 {t['f1']:.3f}; "
            f"random-encoder floor IoU {f['iou']:.3f} F1 {f['f1']:.3f}; raw voxels (no encoder) IoU "
            f"{p['raw_voxels']['iou']:.3f}; calling every voxel a fault would score IoU {p['fault_fraction_test']:.3f}"
        )
    lines += [f"picture: {p}" for p in r["pictures"]]
    lines.append(f"results: {r['json']}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Evaluate one checkpoint of a run on one process.")
    ap.add_argument("--run-dir", required=True, type=Path, help="the run directory (holds checkpoints/)")
    ap.add_argument("--checkpoint", help="step-N or N; default: the newest complete checkpoint")
    ap.add_argument("--data", action="append", help="evaluate on these MDIO volumes instead (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--out", type=Path, help="where eval.json and the PNGs go; default RUN/eval/step-N")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--samples", type=int, help="held-out crops for reconstruction; default eval.samples")
    ap.add_argument("--seed", type=int, help="draws the crops, masks and random encoder; default eval.seed")
    ap.add_argument("--probe-crops", type=int, help="crops to fit the probe on, and to test it on (0: no probe)")
    ap.add_argument("--probe-steps", type=int, help="Adam steps of the probe")
    ap.add_argument("--no-pictures", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for name in ("samples", "probe_crops", "probe_steps"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "probe_crops" else 1):
            print(f"{PROG}: error: --{name.replace('_', '-')}={v}: allowed an integer >= 1", file=sys.stderr)
            return 2
    try:
        result = evaluate(args)
    except (EvalError, RecipeError, CheckpointError, ValueError) as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as e:
        traceback.print_exc()
        print(f"{PROG}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else report(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
