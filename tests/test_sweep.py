"""Scaling sweeps: recipe per node count, efficiency arithmetic, report from recorded runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seiscli.launcher.launch import plan_launch, write_run
from seiscli.launcher.runs import Run
from seiscli.launcher.sweep import (
    Point,
    find_sweep,
    parse_nodes,
    record_sweep,
    svg_plot,
    sweep_points,
    sweep_recipes,
    with_efficiency,
)
from seiscli.recipe import load_recipe


def test_parse_nodes() -> None:
    assert parse_nodes("16,1, 4,2,8") == [1, 2, 4, 8, 16]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(ValueError, match="--nodes"):
            parse_nodes(bad)


def test_recipes_per_count_keep_per_gpu_batch() -> None:
    recipes = sweep_recipes(load_recipe("pretrain"), [1, 2, 16])
    assert [r.name for r in recipes] == ["pretrain-n1", "pretrain-n2", "pretrain-n16"]
    assert [r.global_batch for r in recipes] == [8, 16, 128]
    with pytest.raises(ValueError, match="cluster backend"):
        sweep_recipes(load_recipe("smoke"), [1, 2])


def test_efficiency_is_relative_to_smallest_count() -> None:
    pts = with_efficiency(
        [Point(1, 8, "a", "COMPLETED", 100.0), Point(2, 16, "b", "COMPLETED", 190.0), Point(4, 32, "c", "FAILED", None)]
    )
    assert pts[0].efficiency == pytest.approx(1.0)
    assert pts[1].efficiency == pytest.approx(0.95)
    assert pts[2].efficiency is None
    svg = svg_plot(pts, "t")
    assert svg.startswith("<svg") and "95%" in svg and "100%" in svg


def test_report_from_recorded_runs(tmp_path: Path) -> None:
    base = load_recipe("pretrain", {"cluster.backend": "slurm"})
    runs = []
    for recipe, sps in zip(sweep_recipes(base, [1, 2]), [10.0, 18.0], strict=True):
        run = write_run(plan_launch(recipe, tmp_path))
        (run.path / "summary.json").write_text(json.dumps({"samples_per_s": sps}))
        run.update_submission(state="COMPLETED")
        runs.append(run)
    path = record_sweep("pretrain", runs, [1, 2], tmp_path)
    assert find_sweep("pretrain", tmp_path) == path
    pts = sweep_points(path, tmp_path)
    assert [(p.nodes, p.gpus, p.state) for p in pts] == [(1, 8, "COMPLETED"), (2, 16, "COMPLETED")]
    assert pts[1].efficiency == pytest.approx(0.9)


@pytest.mark.slow
@pytest.mark.slurm(nodes=2)
def test_sweep_on_the_local_slurm_cluster(tmp_path: Path) -> None:
    """scale-sweep submits one real job per node count; sweep-report reads their summaries once they end."""
    from seiscli.launcher.backends.base import JobState
    from tests.test_slurm import seis, wait_for

    runs = tmp_path / "runs"
    out = seis("scale-sweep", "smoke", "--nodes", "1,2", "--steps", "6", "--set", "cluster.backend=slurm", runs=runs)
    assert out.returncode == 0, out.stdout + out.stderr
    swept = [Run(p.parent) for p in sorted(runs.glob("smoke-n*/*/submission.json"))]
    assert [r.path.parent.name for r in swept] == ["smoke-n1", "smoke-n2"]
    for run in swept:
        sub = wait_for(run, {JobState.COMPLETED, JobState.FAILED}, 300)
        assert sub["state"] == "COMPLETED", seis("logs", run.id, runs=runs).stdout
    report = seis("sweep-report", "smoke", "--json", runs=runs)
    assert report.returncode == 0, report.stderr
    doc = json.loads(report.stdout)
    points = doc["points"]
    assert [(p["nodes"], p["state"]) for p in points] == [(1, "COMPLETED"), (2, "COMPLETED")]
    assert points[0]["efficiency"] == pytest.approx(1.0)
    assert all(p["samples_per_s"] > 0 for p in points)
    # Efficiency at 2 nodes is whatever the two runs measured, relative to the first.
    expected = (points[1]["samples_per_s"] / 2) / points[0]["samples_per_s"]
    assert points[1]["efficiency"] == pytest.approx(expected, rel=1e-6)
    assert Path(doc["plot"]).read_text().startswith("<svg")
