"""Run directories: what was launched, where, and what it has written since.

Layout of one run (`<root>/<name>/<timestamp>/`):
  recipe.yaml       the resolved recipe the job runs
  job.sbatch        the rendered job script (Slurm backends) or launch.sh (local)
  submission.json   backend, job id, time, user, host, git revision, state at submission
  logs/             job output (per rank where the backend can)
  metrics.jsonl     one JSON line per training step (written by rank 0 of the trainer)
  summary.json      written by the trainer at the end
  checkpoints/      unless the recipe points elsewhere
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from seiscli.recipe import Recipe

DEFAULT_ROOT = "runs"


def runs_root(explicit: str | Path | None = None) -> Path:
    """The root of all run directories: --runs-dir, else $SEIS_RUNS_DIR, else ./runs."""
    return Path(explicit or os.environ.get("SEIS_RUNS_DIR") or DEFAULT_ROOT).resolve()


def _git_revision(path: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain"], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@dataclass
class Run:
    path: Path

    @property
    def name(self) -> str:
        return self.path.parent.name

    @property
    def id(self) -> str:
        """`<name>/<timestamp>`: unique under a root and what users type."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def submission_path(self) -> Path:
        return self.path / "submission.json"

    def submission(self) -> dict[str, Any]:
        try:
            return json.loads(self.submission_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def update_submission(self, **fields: Any) -> None:
        data = self.submission() | fields
        # A name of this process's own: `seis status` and `seis logs -f` may write back at the same time.
        tmp = self.submission_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.submission_path)

    def summary(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def last_metrics(self, max_bytes: int = 16384) -> dict[str, Any]:
        """The last complete metrics line, read from the file's tail (runs can log millions of steps)."""
        try:
            with self.metrics_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                lines = f.read().splitlines()
        except OSError:
            return {}
        recs = step_records(lines)
        return recs[-1] if recs else {}

    def metrics(self) -> list[dict[str, Any]]:
        """Every step record of metrics.jsonl, in order."""
        try:
            return step_records(self.metrics_path.read_bytes().splitlines())
        except OSError:
            return []


def step_records(lines: Iterable[str | bytes]) -> list[dict[str, Any]]:
    """The metrics records (JSON objects with a "step") among `lines`; a line still being written is skipped."""
    recs = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            recs.append(rec)
    return recs


def create_run(recipe: Recipe, root: str | Path | None = None, *, recipe_source: Path | None = None) -> Run:
    """Make a fresh run directory and write the resolved recipe into it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = runs_root(root) / recipe.name
    base.mkdir(parents=True, exist_ok=True)
    path, n = base / stamp, 1
    while True:
        try:
            path.mkdir()
            break
        except FileExistsError:
            n += 1
            path = base / f"{stamp}-{n}"
    (path / "logs").mkdir()
    run = Run(path)
    run.recipe_path.write_text(recipe.to_yaml())
    run.update_submission(
        name=recipe.name,
        created=time.time(),
        user=getpass.getuser(),
        host=socket.gethostname(),
        recipe_git=_git_revision(recipe_source.parent) if recipe_source else None,
        state="CREATED",
    )
    return run


def iter_runs(root: str | Path | None = None) -> Iterator[Run]:
    """All runs under the root, newest first."""
    base = runs_root(root)
    if not base.is_dir():
        return
    paths = [p.parent for p in base.glob("*/*/submission.json")]
    for p in sorted(paths, key=lambda p: p.name, reverse=True):
        yield Run(p)


def find_run(ref: str, root: str | Path | None = None) -> Run:
    """A run by path, `<name>/<timestamp>`, name (its newest run) or job id."""
    p = Path(ref)
    if (p / "submission.json").is_file():
        return Run(p.resolve())
    base = runs_root(root)
    if (base / ref / "submission.json").is_file():
        return Run(base / ref)
    runs = list(iter_runs(root))
    for run in runs:
        if run.name == ref:
            return run
    for run in runs:
        if str(run.submission().get("job_id")) == ref:
            return run
    raise LookupError(f"no run {ref!r} under {base} (give a run name, <name>/<timestamp>, a job id or a path)")
