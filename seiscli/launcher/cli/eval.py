"""`seis eval RUN`: score a checkpoint (held-out reconstruction, fault probe, pictures) on this machine.

The launcher never imports the trainer or torch: the evaluation runs as `python -m seiscli.train.eval` in a
child process with this interpreter, and its output and exit code (0, 1, or 2 for bad input) pass through.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from seiscli.launcher.cli.common import RunsDir, app, fail

EVAL_MODULE = "seiscli.train.eval"


def run_dir_of(ref: str, runs_dir: Path | None) -> Path:
    """A run directory by path (a run trained straight into a directory counts), name, name/timestamp or job id."""
    from seiscli.launcher.runs import find_run

    p = Path(ref)
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "recipe.yaml").is_file()):
        return p.resolve()
    try:
        return find_run(ref, runs_dir).path
    except LookupError as e:
        fail(str(e))


@app.command("eval")
def eval_(
    run: Annotated[str, typer.Argument(help="Run: path, name (its newest run), <name>/<timestamp> or job id.")],
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="step-N or N; default: the newest complete checkpoint.")
    ] = None,
    data: Annotated[
        list[str] | None, typer.Option("--data", help="Evaluate on these MDIO volumes instead (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda (one GPU).")] = "auto",
    samples: Annotated[int | None, typer.Option("--samples", help="Held-out crops; default eval.samples.")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Draws crops, masks and the random encoder [eval.seed].")
    ] = None,
    probe_crops: Annotated[
        int | None,
        typer.Option(
            "--probe-crops", help="Crops to fit the fault probe on and to test it on; 0 skips it [eval.probe_crops]."
        ),
    ] = None,
    probe_steps: Annotated[
        int | None, typer.Option("--probe-steps", help="Adam steps fitting the probe [eval.probe_steps].")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where eval.json and PNGs go [RUN/eval/step-N].")
    ] = None,
    no_pictures: Annotated[bool, typer.Option("--no-pictures", help="Skip the PNGs.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Evaluate a checkpoint of any strategy on one process: held-out masked reconstruction (loss, PSNR), a
    frozen-encoder fault-segmentation probe against a random-encoder floor, and PNG slices."""
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: allowed auto, cpu, cuda")
    if samples is not None and samples < 1:
        fail(f"--samples {samples}: allowed an integer >= 1")
    if probe_steps is not None and probe_steps < 1:
        fail(f"--probe-steps {probe_steps}: allowed an integer >= 1")
    if probe_crops is not None and probe_crops < 0:
        fail(f"--probe-crops {probe_crops}: allowed an integer >= 0 (0 skips the probe)")
    cmd = [sys.executable, "-m", EVAL_MODULE, "--run-dir", str(run_dir_of(run, runs_dir)), "--device", device]
    if probe_crops is not None:
        cmd += ["--probe-crops", str(probe_crops)]
    if probe_steps is not None:
        cmd += ["--probe-steps", str(probe_steps)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    for uri in data or []:
        cmd += ["--data", uri]
    if samples is not None:
        cmd += ["--samples", str(samples)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    if out_dir is not None:
        cmd += ["--out", str(out_dir)]
    if as_json:
        cmd.append("--json")
    if no_pictures:
        cmd.append("--no-pictures")
    raise typer.Exit(subprocess.run(cmd).returncode)
