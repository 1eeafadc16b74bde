"""The metric viewers, fed by rank 0 of a real training process: TensorBoard event files, an MLflow run (a real
MLflow file store, read back with MlflowClient) and a W&B run (the real client, offline), each holding the
steps of metrics.jsonl and continued by a resumed attempt; and a viewer enabled where its package is missing:
one error line, exit 2, before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seiscli.recipe import load_recipe

pytest.importorskip("tensorboard")  # in the train extra


def _train(tmp_path: Path, *, hide: str | None = None, **sets: object) -> subprocess.CompletedProcess[str]:
    """The trainer on the smoke recipe in tmp_path/run (a second call resumes from its checkpoint). hide: a
    package made unimportable in the trainer's process (None in sys.modules), as if it were not installed."""
    recipe = load_recipe("smoke", {"train.steps": 3, "cluster.cpu_procs_per_node": 1, **sets})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.to_yaml())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    env |= {"WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": ""}
    args = [str(path), "--run-dir", str(tmp_path / "run")]
    run = f"import runpy, sys; sys.modules[{hide!r}] = None; sys.argv[1:] = {args!r}; runpy.run_module('seiscli.train')"
    command = [sys.executable, "-c", run] if hide else [sys.executable, "-m", "seiscli.train", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_the_same_steps_as_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _train(tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    metrics = _metrics(run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in metrics] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in events.Scalars("perf/samples_per_s")] == pytest.approx(
        [m["samples_per_s"] for m in metrics], rel=1e-6
    )
    assert {"train/lr", "perf/data_wait_s", "perf/straggler_ratio"} <= set(events.Tags()["scalars"])


def test_mlflow_run_holds_the_steps_and_a_resumed_attempt_continues_it(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    sets = {"logging.mlflow": {"experiment": "seis-test"}}
    out = _train(tmp_path, **sets)
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr, out.stderr  # no viewer was switched off
    out = _train(tmp_path, **sets, **{"train.steps": 5})  # resumes from the step-3 checkpoint
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the default store: a file store in the run
    client = MlflowClient((run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("seis-test")
    assert experiment is not None
    (found,) = client.search_runs([experiment.experiment_id])  # one MLflow run for both attempts
    assert found.info.status == "FINISHED" and found.data.tags["seis.run_id"] == f"{tmp_path.name}/run"
    assert found.data.params["model.patch_size"] == "8" and found.data.params["train.steps"] == "3"  # the first
    history = client.get_metric_history(found.info.run_id, "train.loss")
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    history.sort(key=lambda h: h.step)
    assert [h.step for h in history] == [1, 2, 3, 4, 5]
    assert [h.value for h in history] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert {"perf.samples_per_s", "train.lr"} <= set(found.data.metrics)


def test_wandb_offline_run_holds_the_steps_and_a_resumed_attempt_keeps_its_id(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    sets = {"logging.wandb": {"project": "seis-test", "mode": "offline"}}
    assert _train(tmp_path, **sets).returncode == 0
    out = _train(tmp_path, **sets, **{"train.steps": 5})
    assert out.returncode == 0, out.stderr
    assert "warning" not in out.stderr, out.stderr
    run = tmp_path / "run"
    run_id = f"{tmp_path.name}-run"
    attempts = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(attempts) == 2  # one offline record per attempt, one W&B run id: `wandb sync` makes them one run
    # W&B's run file is its record stream; every step's loss is in it, as the JSON W&B stores values in.
    records = b"".join((a / f"run-{run_id}.wandb").read_bytes() for a in attempts)
    assert all(json.dumps(m["loss"]).encode() in records for m in _metrics(run))


def test_a_viewer_that_cannot_start_is_switched_off_with_one_warning(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    out = _train(tmp_path, **{"logging.mlflow": {"tracking_uri": "http://127.0.0.1:9"}})  # nothing listens
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: mlflow")]
    assert len(warnings) == 1, out.stderr
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3]  # training went on


def test_a_tracking_store_that_fails_mid_run_switches_mlflow_off_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    import shutil
    import time

    from seiscli.train.viewers import Viewers

    recipe = load_recipe("smoke", {"logging.tensorboard": False, "logging.mlflow": {"experiment": "e"}})
    viewers = Viewers(recipe, tmp_path, is_main=True, start_step=0, run_id="r/1")
    viewers.log({"step": 1, "loss": 1.0})
    shutil.rmtree(tmp_path / "mlruns")  # the store is gone under the run: the sender's next batch fails
    deadline = time.monotonic() + 60
    step = 2
    while viewers._mlflow is not None and time.monotonic() < deadline:
        viewers.log({"step": step, "loss": 1.0})  # never raises: the training loop goes on
        step += 1
        time.sleep(0.05)
    assert viewers._mlflow is None
    viewers.log({"step": step, "loss": 1.0})
    viewers.close("completed")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: mlflow")]
    assert len(warnings) == 1, warnings


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
    out = _train(tmp_path, hide=package, **sets)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and field in errors[0] and f"pip install {package}" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_viewer_section_with_a_bad_field_is_a_recipe_error() -> None:
    from seiscli.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"logging\.wandb\.mode"):
        load_recipe("smoke", {"logging.wandb": {"project": "p", "mode": "sometimes"}})
