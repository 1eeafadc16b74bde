"""The metric viewers ML engineers already use, fed by rank 0 from the same step records as metrics.jsonl:
TensorBoard event files in <run dir>/tensorboard/, and Weights & Biases or MLflow when the recipe enables them.

metrics.jsonl stays the source of truth for seis itself; a viewer that fails mid-run is switched off with one
warning rather than stopping a training run. A viewer the recipe asks for whose package is missing is a launch
error (exit 2) at start, before any rank has done work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from seiscli.recipe import Recipe, flatten
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
    """Opened on every rank; writes only on rank 0. A requeued or resumed attempt continues the same W&B run
    (its id) and the same MLflow run (its `seis.run_id` tag); in both, the steps an earlier attempt logged past
    the checkpoint stay (W&B ignores a step below its last one; MLflow keeps both values of such a step)."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, is_main: bool, start_step: int, run_id: str) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        self._mlflow: _Mlflow | None = None
        if not is_main:
            return
        log = recipe.logging
        if log.tensorboard is not False and _installed("tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events past its checkpoint, as metrics.jsonl does.
            self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        config = recipe.model_dump(mode="json")
        wandb_cfg, mlflow_cfg = log.wandb, log.mlflow
        if wandb_cfg is not None:
            self._wandb = self._safely("wandb", lambda: _start_wandb(wandb_cfg, run_dir, run_id, config))
        if mlflow_cfg is not None:
            self._mlflow = self._safely("mlflow", lambda: _Mlflow(mlflow_cfg, run_dir, run_id, config))

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {f"{_GROUPS[k]}/{k}": float(v) for k, v in record.items() if k in _GROUPS and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step, walltime=record.get("time"))
        if self._wandb is not None:
            self._safely("wandb", lambda: self._wandb.log(scalars, step=step))
        if self._mlflow is not None:
            mlflow = self._mlflow
            self._safely("mlflow", lambda: mlflow.log(scalars, step, record.get("time")))

    def _safely(self, name: str, call: Any) -> Any:
        """call(), or, when it raises, one warning and that viewer switched off (None)."""
        try:
            return call()
        except Exception as e:  # a viewer's server being down must not end (or stop the start of) a training run
            print(f"warning: {name} logging failed, switched off: {type(e).__name__}: {e}", file=sys.stderr)
            setattr(self, f"_{name}", None)
            return None

    def close(self, status: str = "completed") -> None:
        """status: the summary's ("completed", "stopped" for a signal or requeue, "failed")."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        wandb_run, self._wandb = self._wandb, None
        if wandb_run is not None:
            self._safely("wandb", lambda: wandb_run.finish(exit_code=1 if status == "failed" else 0))
        mlflow, self._mlflow = self._mlflow, None
        if mlflow is not None:
            self._safely("mlflow", lambda: mlflow.end(status))


def _start_wandb(cfg: Any, run_dir: Path, run_id: str, config: dict[str, Any]) -> Any:
    import wandb

    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=run_id,
        id=run_id.replace("/", "-"),
        resume="allow",  # a requeued attempt continues the same W&B run
        dir=str(run_dir),
        mode=cfg.mode,
        config=config,
    )


# MLflow run status for the summary's status: a stopped (requeued) run is set running again by its next attempt.
_MLFLOW_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
RUN_ID_TAG = "seis.run_id"


class _Mlflow:
    """One MLflow run per seis run, through MlflowClient (no process-global active run). Metrics go out from a
    thread of their own: rank 0 waiting on a tracking server every step would make it every step's straggler.
    A server that fails switches MLflow off with one warning; closing waits at most CLOSE_TIMEOUT_S."""

    CLOSE_TIMEOUT_S = 30.0
    # MLflow retries a failing request for minutes by default (7 retries, backoff 2): at start that holds every
    # rank; these bound it unless the job's environment says otherwise.
    HTTP_DEFAULTS: ClassVar[dict[str, str]] = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    }

    def __init__(self, cfg: Any, run_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        for key, value in self.HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The default: a file store in the run directory (`mlflow ui --backend-store-uri <run dir>/mlruns`).
            # MLflow 3 keeps file stores in maintenance mode and refuses them unless this is set.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        earlier = client.search_runs([experiment_id], f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        if earlier:
            run = earlier[0]
            client.update_run(run.info.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id})
        self.run_id = run.info.run_id
        # A param cannot change its value in MLflow: an attempt logs only the fields an earlier one did not.
        logged = run.data.params
        params = [Param(k, str(v)) for k, v in flatten(config).items() if v is not None and k not in logged]
        client.log_batch(self.run_id, params=params)
        self.failed: str | None = None
        self._queue: queue.Queue[list[Any] | None] = queue.Queue(maxsize=10_000)
        self._sender = threading.Thread(target=self._send, name="seis-mlflow", daemon=True)
        self._sender.start()

    def log(self, scalars: dict[str, float], step: int, when: float | None) -> None:
        from mlflow.entities import Metric

        if self.failed:
            raise RuntimeError(self.failed)  # the sender's error, reported (once) by the caller
        ms = int((when if when is not None else time.time()) * 1000)
        try:
            self._queue.put_nowait([Metric(k.replace("/", "."), v, ms, step) for k, v in scalars.items()])
        except queue.Full:
            behind = f"{self._queue.maxsize} steps not yet sent"
            raise RuntimeError(f"{behind}: the tracking server does not keep up") from None

    def _send(self) -> None:
        while (metrics := self._queue.get()) is not None:
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except Exception as e:
                self.failed = f"{type(e).__name__}: {e}"
                return

    def end(self, status: str) -> None:
        if self.failed:  # the sender has stopped: nothing will take what is queued
            raise RuntimeError(self.failed)
        deadline = time.monotonic() + self.CLOSE_TIMEOUT_S
        with contextlib.suppress(queue.Full):  # a full queue: the sender is stuck, and the join below says so
            self._queue.put(None, timeout=self.CLOSE_TIMEOUT_S)
        self._sender.join(max(0.0, deadline - time.monotonic()))
        if self._sender.is_alive():
            raise TimeoutError(f"metrics not all sent within {self.CLOSE_TIMEOUT_S:.0f} s; the run is left as it is")
        if self.failed:
            raise RuntimeError(self.failed)
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS[status])
