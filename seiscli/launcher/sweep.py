"""Scaling sweeps: the same recipe on 1, 2, 4, ... nodes, and the efficiency table and plot.

Weak scaling: each GPU keeps its micro batch, so the global batch grows with the node count.
Efficiency at n nodes = (samples/s at n / n) / (samples/s at the smallest count / that count).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seiscli.launcher.runs import Run, find_run, runs_root
from seiscli.recipe import Recipe, validate

SWEEPS_DIR = "_sweeps"


def parse_nodes(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--nodes {text!r}: expected a comma-separated list of node counts, e.g. 1,2,4,8,16") from None
    if not counts or counts[0] < 1:
        raise ValueError(f"--nodes {text!r}: node counts must be >= 1")
    return counts


def sweep_recipes(recipe: Recipe, counts: list[int]) -> list[Recipe]:
    """One recipe per node count, named `<name>-n<count>`; all validated before anything is launched."""
    if recipe.cluster.backend == "local":
        raise ValueError("a scaling sweep needs a cluster backend (slurm or hyperpod-slurm), not local")
    out = []
    for n in counts:
        data = recipe.model_dump(mode="json")
        data["cluster"]["nodes"] = n
        data["name"] = f"{recipe.name}-n{n}"
        out.append(validate(data))
    return out


def record_sweep(name: str, runs: list[Run], counts: list[int], root: str | Path | None) -> Path:
    base = runs_root(root) / SWEEPS_DIR
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.write_text(
        json.dumps(
            {"name": name, "created": time.time(), "runs": {str(n): r.id for n, r in zip(counts, runs, strict=True)}},
            indent=2,
        )
    )
    return path


def find_sweep(ref: str, root: str | Path | None) -> Path:
    p = Path(ref)
    if p.is_file():
        return p
    base = runs_root(root) / SWEEPS_DIR
    matches = sorted(base.glob(f"{ref}*.json")) if base.is_dir() else []
    if not matches:
        raise LookupError(f"no sweep {ref!r} under {base}")
    return matches[-1]


@dataclass
class Point:
    nodes: int
    gpus: int
    run: str
    state: str
    samples_per_s: float | None
    efficiency: float | None = None


def throughput(run: Run) -> float | None:
    """Steady-state samples/s: the trainer's summary, else the mean of the last logged steps."""
    summary = run.summary()
    if isinstance(summary.get("samples_per_s"), (int, float)):
        return float(summary["samples_per_s"])
    last = run.last_metrics()
    value = last.get("samples_per_s")
    return float(value) if isinstance(value, (int, float)) else None


def sweep_points(sweep_file: Path, root: str | Path | None) -> list[Point]:
    data = json.loads(sweep_file.read_text())
    points = []
    for n_text, run_id in sorted(data["runs"].items(), key=lambda kv: int(kv[0])):
        run = find_run(run_id, root)
        sub = run.submission()
        from seiscli.recipe import load_recipe

        recipe = load_recipe(str(run.recipe_path))
        points.append(
            Point(
                nodes=int(n_text),
                gpus=recipe.cluster.world_size,
                run=run.id,
                state=sub.get("state", "UNKNOWN"),
                samples_per_s=throughput(run),
            )
        )
    return with_efficiency(points)


def with_efficiency(points: list[Point]) -> list[Point]:
    base = next((p for p in points if p.samples_per_s), None)
    if base is None:
        return points
    per_node = base.samples_per_s / base.nodes  # type: ignore[operator]
    for p in points:
        if p.samples_per_s:
            p.efficiency = (p.samples_per_s / p.nodes) / per_node
    return points


def report_rows(points: list[Point]) -> list[dict[str, Any]]:
    return [p.__dict__ for p in points]


def svg_plot(points: list[Point], title: str) -> str:
    """A dependency-free SVG: measured vs ideal samples/s over nodes (log2 x axis), efficiency labels."""
    pts = [p for p in points if p.samples_per_s]
    w, h, m = 640, 400, 60
    if not pts:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><text x="20" y="40">no data</text></svg>'
        )
    import math

    xs = [math.log2(p.nodes) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    base = pts[0]
    ideal = {p.nodes: base.samples_per_s / base.nodes * p.nodes for p in points}  # type: ignore[operator]
    ymax = max([*ideal.values(), *(p.samples_per_s for p in pts)]) * 1.1  # type: ignore[misc]

    def sx(n: int) -> float:
        return m + (math.log2(n) - x0) / (x1 - x0) * (w - 2 * m)

    def sy(v: float) -> float:
        return h - m - v / ymax * (h - 2 * m)

    def line(coords: list[tuple[float, float]], style: str) -> str:
        return f'<polyline fill="none" {style} points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">{title}</text>',
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
        f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">nodes</text>',
        f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">samples/s</text>',
        line([(sx(n), sy(v)) for n, v in sorted(ideal.items())], 'stroke="#999" stroke-dasharray="6,4"'),
        line([(sx(p.nodes), sy(p.samples_per_s)) for p in pts], 'stroke="#1f77b4" stroke-width="2"'),  # type: ignore[arg-type]
    ]
    for p in points:
        parts.append(f'<text x="{sx(p.nodes):.1f}" y="{h - m + 16}" text-anchor="middle">{p.nodes}</text>')
    for p in pts:
        x, y = sx(p.nodes), sy(p.samples_per_s)  # type: ignore[arg-type]
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#1f77b4"/>')
        parts.append(f'<text x="{x:.1f}" y="{y - 10:.1f}" text-anchor="middle">{p.efficiency:.0%}</text>')
    for frac in (0.25, 0.5, 0.75, 1.0):
        v = ymax * frac
        parts.append(f'<text x="{m - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    parts.append(f'<text x="{w - m}" y="{m - 8}" text-anchor="end" fill="#999">dashed: ideal linear scaling</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
