"""TensorBoard event files beside metrics.jsonl (rank 0 of a real training process), and W&B / MLflow enabled
where their package is missing: one error line, exit 2, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seiscli.recipe import load_recipe

pytest.importorskip("tensorboard")  # in the train extra


def _train(tmp_path: Path, **sets: object) -> subprocess.CompletedProcess[str]:
    recipe = load_recipe("smoke", {"train.steps": 3, "cluster.cpu_procs_per_node": 1, **sets})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    return subprocess.run(
        [sys.executable, "-m", "seiscli.train", str(path), "--run-dir", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_tensorboard_events_hold_the_same_steps_as_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _train(tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in metrics] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in events.Scalars("perf/samples_per_s")] == pytest.approx(
        [m["samples_per_s"] for m in metrics], rel=1e-6
    )
    assert {"train/lr", "perf/data_wait_s", "perf/straggler_ratio"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize(
    ("sets", "field", "package"),
    [
        ({"logging.wandb": {"project": "seis-test"}}, "logging.wandb", "wandb"),
        ({"logging.mlflow": {"experiment": "seis-test"}}, "logging.mlflow", "mlflow"),
    ],
)
def test_an_enabled_viewer_without_its_package_is_exit_2(
    tmp_path: Path, sets: dict[str, object], field: str, package: str
) -> None:
    try:
        __import__(package)
        pytest.skip(f"{package} is installed here: the missing-package path cannot be seen")
    except ImportError:
        pass
    out = _train(tmp_path, **sets)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and field in errors[0] and f"pip install {package}" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_viewer_section_with_a_bad_field_is_a_recipe_error() -> None:
    from seiscli.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"logging\.wandb\.mode"):
        load_recipe("smoke", {"logging.wandb": {"project": "p", "mode": "sometimes"}})
