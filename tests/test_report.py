"""`seis report RUN`: a PNG of loss, throughput/MFU and data wait, with the ledger's attempts marked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seiscli.launcher.runs import Run, create_run
from seiscli.recipe import load_recipe
from seiscli.run_layout import append_event

mpimg = pytest.importorskip("matplotlib.image")  # the `plot` extra

RED = (0xD6 / 255, 0x27 / 255, 0x28 / 255)  # matplotlib's tab:red, the attempt marks


def _run(root: Path, *, attempts: bool, evals: bool = False) -> Run:
    run = create_run(load_recipe("smoke", {"name": "rep"}), root)
    lines = []
    for s in range(1, 81):
        rec = {"step": s, "loss": 1.0 / s, "samples_per_s": 50.0 + s % 7, "step_time_s": 0.2, "data_wait_s": 0.02,
               "mfu": 0.4, "time": 1000.0 + s}  # fmt: skip
        lines.append(json.dumps(rec))
        if evals and s % 20 == 0:
            lines.append(json.dumps({"step": s, "eval": True, "eval_loss": 1.2 / s}))
    run.metrics_path.write_text("\n".join(lines) + "\n")
    if attempts:
        for k, first in ((1, 1), (2, 41)):
            append_event(run.path, {"event": "start", "attempt": k, "job_id": "7", "time": 1000.0 + first})
            append_event(run.path, {"event": "trainer", "attempt": k, "first_step": first, "time": 1000.0 + first})
    return run


def _report(run: Run, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", "report", run.id, *extra],
        env={**os.environ, "SEIS_RUNS_DIR": str(run.path.parent.parent)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _red_pixels(png: Path) -> int:
    img = mpimg.imread(png)[:, :, :3]
    return int((abs(img - RED).max(axis=2) < 0.02).sum())


def test_report_writes_a_png_and_marks_the_second_attempt(tmp_path: Path) -> None:
    marked = _run(tmp_path / "a", attempts=True, evals=True)
    out = _report(marked)
    assert out.returncode == 0, out.stderr
    png = marked.path / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in out.stdout
    assert mpimg.imread(png).shape[:2] == (900, 1000)
    from seiscli.launcher.report_plot import attempt_marks

    assert attempt_marks(marked) == [(41, "attempt 2")]
    plain = _run(tmp_path / "b", attempts=False)
    assert _report(plain, "--output", str(tmp_path / "plain.png")).returncode == 0
    assert _red_pixels(png) > 100 and _red_pixels(tmp_path / "plain.png") == 0


def test_report_refuses_a_run_without_steps_and_a_non_png_output(tmp_path: Path) -> None:
    run = create_run(load_recipe("smoke", {"name": "rep"}), tmp_path)
    empty = _report(run)
    assert empty.returncode == 2 and "no training steps" in empty.stderr
    bad = _report(_run(tmp_path / "c", attempts=False), "--output", str(tmp_path / "x.svg"))
    assert bad.returncode == 2 and "--output" in bad.stderr and not (tmp_path / "x.svg").exists()
