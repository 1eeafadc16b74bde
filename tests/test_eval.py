"""`seis eval` and the held-out split: training never reads the held-out inlines (through the loader), eval of
each strategy's checkpoint gives the same numbers, the trained smoke model reconstructs held-out crops
better than its initialisation, periodic eval lands in metrics.jsonl, bad input exits 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from seiscli.data.split import train_inlines
from seiscli.data.volume import open_volume
from seiscli.data.write import write_volume
from seiscli.recipe import RecipeError, load_recipe
from tests.test_train_entry import TINY

FIXTURE = Path(__file__).parent / "data" / "smoke-h200"  # the smoke recipe trained 4000 steps on an H200 (QUALITY.md)
SENTINEL = 1000.0


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["SEIS_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_training_never_reads_the_held_out_inlines(tmp_path: Path) -> None:
    import torch

    from seiscli.train import heldout
    from seiscli.train.data import build_loader

    shape, fraction = (40, 12, 16), 0.25
    first = train_inlines(shape[0], fraction)
    assert first == 30
    vol = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    vol[first:] = SENTINEL  # any crop voxel from the held-out inlines would show as this value
    uri = str(tmp_path / "v.mdio")
    write_volume(uri, vol, chunks=(8, 8, 8))
    recipe = load_recipe(
        "smoke",
        {**TINY, "data.source": "mdio", "data.uris": [uri], "data.crop": [8, 8, 8], "data.normalization": "none",
         "data.holdout_fraction": fraction, "data.workers": 0, "train.micro_batch": 16},
    )  # fmt: skip
    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    batches = iter(loader)
    seen = torch.cat([next(batches) for _ in range(25)])  # 400 crops with flips and transposes
    assert float(seen.max()) < SENTINEL
    # The training region is used up to its last inline: the cut is exactly at the split, not short of it.
    ends = {loader.dataset.spec(i).origin[0] + 8 for i in range(400)}
    assert max(ends) == first
    # Evaluation reads only the held-out inlines.
    volumes = loader.dataset.volumes
    specs = heldout.draw_specs(volumes, (8, 8, 8), fraction, 6, 0, heldout=True)
    crops = heldout.read_crops(loader.dataset, specs, labels=False)
    assert bool((crops.data == SENTINEL).all())


def test_a_held_out_region_narrower_than_the_crop_is_refused(tmp_path: Path) -> None:
    from seiscli.train.data import build_loader

    uri = str(tmp_path / "v.mdio")
    write_volume(uri, np.zeros((20, 8, 8), dtype=np.float32), chunks=(8, 8, 8))
    recipe = load_recipe(
        "smoke",
        {**TINY, "data.source": "mdio", "data.uris": [uri], "data.crop": [8, 8, 8], "data.normalization": "none",
         "data.holdout_fraction": 0.7},
    )  # fmt: skip
    import torch

    with pytest.raises(ValueError, match=r"data.holdout_fraction=0.7 leaves 6 training inlines"):
        build_loader(recipe, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    with pytest.raises(RecipeError, match=r"eval.interval=5 but data.holdout_fraction=0"):
        load_recipe("smoke", {"eval.interval": 5})


def test_synthetic_volumes_carry_fault_labels_in_the_dataset(tmp_path: Path) -> None:
    from seiscli.data.synth import fault_labels

    proc = subprocess.run(
        [sys.executable, "-m", "seiscli", "data", "synth", str(tmp_path / "s.mdio"), "--shape", "24", "32", "40",
         "--chunks", "16", "16", "16"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    vol = open_volume(str(tmp_path / "s.mdio"))
    labels = vol.read_variable("fault_mask", (0, 0, 0), vol.shape)
    assert labels.dtype == np.uint8 and 0.0 < labels.mean() < 0.3
    np.testing.assert_array_equal(labels, fault_labels((24, 32, 40), 0))


def _eval(run_dir: Path, tmp_path: Path, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "seiscli", "eval", str(run_dir), "--json", "--device", "cpu", *extra]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_trained_smoke_model_reconstructs_held_out_crops_better_than_its_initialisation(tmp_path: Path) -> None:
    """The committed checkpoint: the smoke recipe (data.holdout_fraction 0.34) trained 4000 steps on one H200
    (QUALITY.md); its Adam moments were dropped to keep the file small. Measured on CPU: held-out masked-patch
    loss 0.418 trained, 1.0 at initialisation (the loss of predicting each patch's mean)."""
    trained = _eval(FIXTURE, tmp_path, "--probe-crops", "0", "--out", str(tmp_path / "eval"))
    rec = trained["reconstruction"]
    assert rec["samples"] == 8 and rec["loss"] < 0.5 and rec["psnr_db"] > 19.0
    assert (tmp_path / "eval" / "reconstruction.png").stat().st_size > 10_000
    assert trained["step"] == 4000 and Path(trained["json"]).is_file()


def test_trained_smoke_models_fault_probe_beats_a_random_encoder_raw_voxels_and_chance(tmp_path: Path) -> None:
    """The probe at its defaults (eval.probe_crops 64, eval.probe_steps 300), over eval seeds 0-3 (each its own
    crops and random encoder). Measured on CPU, IoU trained / random encoder / raw voxels / every voxel a fault:
    seed 0 0.140/0.095/0.070/0.064, 1 0.112/0.121/0.104/0.052, 2 0.154/0.116/0.085/0.058, 3 0.142/0.106/0.064/
    0.057: one seed in four has the random encoder ahead, so the claim is on the mean. At 8 crops (the old
    default) the probe was data-starved and put the trained encoder below chance (0.046 vs 0.074, seed 0)."""
    runs = [
        _eval(FIXTURE, tmp_path, "--no-pictures", "--samples", "1", "--seed", str(seed), "--out", str(tmp_path / "e"))
        for seed in range(4)
    ]
    probes = [r["probe"] for r in runs]
    assert all((p["crops"], p["steps"]) == (64, 300) for p in probes)
    assert len({r["eval_seed"] for r in runs}) == 4

    def mean(key: str) -> float:
        return sum(p[key]["iou"] for p in probes) / len(probes)

    chance = sum(p["fault_fraction_test"] for p in probes) / len(probes)
    assert mean("trained") > mean("random_encoder") + 0.015 and mean("trained") > mean("raw_voxels") + 0.03, probes
    assert mean("trained") > chance + 0.05, probes


def test_bad_eval_input_exits_2_with_one_line(tmp_path: Path) -> None:
    def seis(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "seiscli", *args], env=_env(tmp_path), capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    proc = seis("eval", str(FIXTURE), "--checkpoint", "step-7", "--device", "cpu")
    assert proc.returncode == 2 and "step-7" in proc.stderr and "present: step-004000" in proc.stderr
    proc = seis("eval", str(FIXTURE), "--device", "tpu")
    assert proc.returncode == 2 and "--device 'tpu': allowed auto, cpu, cuda" in proc.stderr
    proc = seis("eval", "no-such-run", "--runs-dir", str(tmp_path))
    assert proc.returncode == 2 and "no run 'no-such-run'" in proc.stderr


def _train(tmp_path: Path, name: str, overrides: dict[str, Any], nproc: int) -> Path:
    recipe = load_recipe("smoke", {**TINY, "cluster.cpu_procs_per_node": nproc, **overrides})
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "seiscli.train", str(run_dir / "recipe.yaml"), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


SMALL = {"data.synth_shape": [24, 16, 32], "data.holdout_fraction": 0.34, "train.steps": 4, "train.micro_batch": 2,
         "eval.samples": 4}  # fmt: skip


def test_periodic_eval_logs_the_held_out_loss_beside_the_training_loss(tmp_path: Path) -> None:
    run_dir = _train(tmp_path, "run", {**SMALL, "eval.interval": 2}, nproc=1)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4]
    # The last one is what `seis eval` reports for the final checkpoint: same crops, same masks.
    result = _eval(run_dir, tmp_path, "--probe-crops", "0", "--no-pictures")
    assert result["reconstruction"]["loss"] == pytest.approx(lines[-1]["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_eval_of_each_strategys_checkpoint_gives_the_same_numbers(tmp_path: Path) -> None:
    """One recipe trained by DDP, FSDP2, ZeRO-2 and ZeRO-3 on 2 processes (equivalent training, pinned by their own
    tests); each checkpoint is loaded on one process (FSDP2's DCP shards resharded, ZeRO's partitions merged)."""
    results = {}
    for strategy in ("ddp", "fsdp2", "zero2", "zero3"):
        run_dir = _train(tmp_path, strategy, {**SMALL, "parallelism.strategy": strategy, "eval.interval": 4}, nproc=2)
        results[strategy] = _eval(run_dir, tmp_path, "--probe-crops", "2", "--probe-steps", "20", "--no-pictures")
        # Periodic eval ran collectively inside the strategy (sharded forward for FSDP2) and agrees with it.
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["eval_loss"] == pytest.approx(results[strategy]["reconstruction"]["loss"], rel=1e-5)
    ref = results["ddp"]
    assert ref["saved_world_size"] == 2
    for strategy in ("fsdp2", "zero2", "zero3"):
        got = results[strategy]
        assert got["strategy"] == strategy and got["saved_world_size"] == 2
        assert got["reconstruction"]["loss"] == pytest.approx(ref["reconstruction"]["loss"], rel=1e-4)
        assert got["reconstruction"]["psnr_db"] == pytest.approx(ref["reconstruction"]["psnr_db"], rel=1e-4)
        assert got["probe"]["trained"]["iou"] == pytest.approx(ref["probe"]["trained"]["iou"], abs=1e-3)
        assert got["probe"]["random_encoder"] == ref["probe"]["random_encoder"]  # the same initialisation


@pytest.mark.slow
def test_periodic_eval_under_context_parallelism_equals_seis_eval(tmp_path: Path) -> None:
    """cp=2: each rank of the group holds a slab of every held-out crop; the group's eval loss is the loss of
    whole crops, as `seis eval` computes it on one process."""
    over = {**SMALL, "parallelism.strategy": "fsdp2", "parallelism.cp": 2, "eval.interval": 2}
    run_dir = _train(tmp_path, "cp2", over, nproc=2)
    result = _eval(run_dir, tmp_path, "--probe-crops", "0", "--no-pictures")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4]
    assert result["saved_world_size"] == 2 and result["reconstruction"]["loss"] == pytest.approx(
        lines[-1]["eval_loss"], rel=1e-5
    )


def test_seis_eval_in_the_launcher_imports_neither_torch_nor_the_trainer(tmp_path: Path) -> None:
    from tests.test_cli import imported_after

    for args in (["eval", "--help"], ["eval", "no-such-run"]):
        mods, _ = imported_after(args, tmp_path)
        assert mods == []
    code = "import sys, seiscli.launcher.cli\nprint(sorted(m for m in sys.modules if m.startswith('seiscli.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
