"""`seis report RUN`: one PNG of a run, drawn with matplotlib (the `plot` extra; only this module imports it).

Panels over the training step: loss (and any eval_* values the metrics carry), throughput (samples/s, with MFU
on a second axis where the GPU's peak is known), and the share of step time spent waiting for data. Every
attempt of the ledger (attempts.jsonl) that resumed is marked by a vertical line at its first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a login node

import matplotlib.pyplot as plt

from seiscli.launcher.runs import Run, step_records


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training step records, and eval records (`"eval": true`, or any record with eval_* numbers)."""
    train, evals = [], []
    try:
        recs = step_records(path.read_bytes().splitlines())
    except OSError:
        return [], []
    for rec in recs:
        if rec.get("eval") or any(k.startswith("eval_") for k in rec):
            evals.append(rec)
        if "loss" in rec and not rec.get("eval"):
            train.append(rec)
    return train, evals


def attempt_marks(run: Run) -> list[tuple[int, str]]:
    """(first step, label) of each attempt after the first, from the attempt ledger."""
    from seiscli.run_layout import read_attempts

    marks = []
    for a in read_attempts(run.path)[1:]:
        if a.get("first_step") is not None:
            marks.append((int(a["first_step"]), f"attempt {a['attempt']}"))
    return marks


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out, acc = 2 / (span + 1), [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def write_report(run: Run, output: Path) -> Path:
    train, evals = read_metrics(run.metrics_path)
    if not train:
        raise ValueError(f"run {run.id} has no training steps in {run.metrics_path} yet")
    steps = [r["step"] for r in train]
    span = max(1, len(train) // 50)
    fig, (ax_loss, ax_tp, ax_wait) = plt.subplots(3, 1, figsize=(10, 9), sharex=True, constrained_layout=True)
    fig.suptitle(f"{run.id}  ({len(train)} steps)")

    loss = [r["loss"] for r in train]
    ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
    ax_loss.plot(steps, _ema(loss, span), color="tab:blue", label=f"loss (EMA {span})")
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval_") and isinstance(r[k], (int, float))})
    if evals and not eval_keys and all("loss" in r for r in evals):
        eval_keys = ["loss"]
    for key in eval_keys:
        pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
        ax_loss.plot(*zip(*pts, strict=True), marker="o", linestyle="--", label=key if key != "loss" else "eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")

    sps = [r.get("samples_per_s") for r in train]
    ax_tp.plot(steps, sps, color="tab:green", alpha=0.3, linewidth=0.8)
    ax_tp.plot(steps, _ema([v or 0.0 for v in sps], span), color="tab:green", label="samples/s")
    ax_tp.set_ylabel("samples/s")
    if any("mfu" in r for r in train):
        ax_mfu = ax_tp.twinx()
        mfu = [100 * r.get("mfu", 0.0) for r in train]
        ax_mfu.plot(steps, mfu, color="tab:purple", alpha=0.25, linewidth=0.8)
        ax_mfu.plot(steps, _ema(mfu, span), color="tab:purple", label="MFU %")
        ax_mfu.set_ylabel("MFU %")
        ax_mfu.legend(loc="lower right")
    ax_tp.legend(loc="upper right")

    wait = [100 * r.get("data_wait_s", 0.0) / r["step_time_s"] if r.get("step_time_s") else 0.0 for r in train]
    ax_wait.plot(steps, wait, color="tab:orange", alpha=0.3, linewidth=0.8)
    ax_wait.plot(steps, _ema(wait, span), color="tab:orange", label="data wait % of step time")
    ax_wait.set_ylabel("data wait %")
    ax_wait.set_xlabel("step")
    ax_wait.legend(loc="upper right")

    for step, label in attempt_marks(run):
        for ax in (ax_loss, ax_tp, ax_wait):
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
        ax_loss.annotate(label, (step, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", color="tab:red")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output
