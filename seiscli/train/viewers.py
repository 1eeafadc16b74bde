"""The metric viewers ML engineers already use, fed by rank 0 from the same step records as metrics.jsonl:
TensorBoard event files in <run dir>/tensorboard/, and Weights & Biases or MLflow when the recipe enables them.

metrics.jsonl stays the source of truth for seis itself; a viewer that fails mid-run is switched off with one
warning rather than stopping a training run. A viewer the recipe asks for whose package is missing is a launch
error (exit 2) at start, before any rank has done work.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from seiscli.recipe import Recipe
from seiscli.train.errors import LaunchError

TENSORBOARD_DIR = "tensorboard"
# Step-record keys shown, grouped as the viewers' panels.
_GROUPS = {
    "loss": "train",
    "lr": "train",
    "grad_norm": "train",
    "samples_per_s": "perf",
    "tokens_per_s": "perf",
    "tflops_per_gpu": "perf",
    "mfu": "perf",
    "step_time_s": "perf",
    "step_time_max_s": "perf",
    "straggler_ratio": "perf",
    "data_wait_s": "perf",
    "max_mem_gb": "perf",
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_viewers(recipe: Recipe) -> None:
    """Refuse at start a viewer the recipe enables but this environment lacks (LaunchError: exit 2)."""
    log = recipe.logging
    wanted = [
        ("logging.tensorboard", "tensorboard", "tensorboard", log.tensorboard is True),
        ("logging.wandb", "wandb", "wandb", log.wandb is not None),
        ("logging.mlflow", "mlflow", "mlflow", log.mlflow is not None),
    ]
    for field, module, package, on in wanted:
        if on and not _installed(module):
            raise LaunchError(
                f"{field} is enabled but the {package!r} package is not installed in the job's environment; "
                f"pip install {package} there, or remove {field} from the recipe"
            )


class Viewers:
    """Opened on every rank; writes only on rank 0."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, is_main: bool, start_step: int, run_id: str) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        self._mlflow: Any = None
        if not is_main:
            return
        log = recipe.logging
        if log.tensorboard is not False and _installed("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events past its checkpoint, as metrics.jsonl does.
            self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        config = recipe.model_dump(mode="json")
        if log.wandb is not None:
            import wandb

            self._wandb = wandb.init(
                project=log.wandb.project,
                entity=log.wandb.entity,
                name=run_id,
                id=run_id.replace("/", "-"),
                resume="allow",  # a requeued attempt continues the same W&B run
                dir=str(run_dir),
                mode=log.wandb.mode,
                config=config,
            )
        if log.mlflow is not None:
            import mlflow

            mlflow.set_tracking_uri(log.mlflow.tracking_uri or _default_mlflow_uri(run_dir))
            mlflow.set_experiment(log.mlflow.experiment)
            self._mlflow = mlflow.start_run(run_name=run_id)
            mlflow.log_params({k: v for k, v in _flat(config).items() if v is not None})

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {f"{_GROUPS[k]}/{k}": float(v) for k, v in record.items() if k in _GROUPS and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step, walltime=record.get("time"))
        self._safely("wandb", lambda: self._wandb.log(scalars, step=step) if self._wandb else None)
        if self._mlflow is not None:
            import mlflow

            names = {k.replace("/", "."): v for k, v in scalars.items()}
            self._safely("mlflow", lambda: mlflow.log_metrics(names, step=step))

    def _safely(self, name: str, call: Any) -> None:
        try:
            call()
        except Exception as e:  # a viewer's server being down must not end a training run
            print(f"warning: {name} logging failed, switched off: {type(e).__name__}: {e}", file=sys.stderr)
            setattr(self, f"_{name}", None)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()
            self._mlflow = None


def _default_mlflow_uri(run_dir: Path) -> str:
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = str(v) if isinstance(v, (list, tuple)) else v
    return out
