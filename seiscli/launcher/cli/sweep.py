"""`seis scale-sweep` (plan, submit or predict) and `seis sweep-report`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from seiscli.launcher.cli.common import CP, RunsDir, Sets, StrategyOpt, ZeroStage, app, fail, out, resolve
from seiscli.recipe import RecipeError, find_recipe


def _pct(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1%}" if signed else f"{v:.1%}"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


@app.command("scale-sweep")
def scale_sweep(
    recipe: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    nodes: Annotated[str, typer.Option("--nodes", "-N", help="Node counts, comma-separated.")] = "1,2,4,8,16",
    mode: Annotated[
        str, typer.Option("--mode", help="weak: per-GPU batch fixed; strong: global batch fixed.")
    ] = "weak",
    steps: Annotated[int | None, typer.Option("--steps", help="Timed steps per size [30].")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Warm-up steps per size, not timed.")] = 10,
    step_time: Annotated[
        float | None, typer.Option("--step-time", help="Seconds per step at the smallest size (for the time limit).")
    ] = None,
    strategy: StrategyOpt = None,
    zero_stage: ZeroStage = None,
    cp: CP = None,
    set_: Sets = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan (sizes, steps, node-hours); submit nothing.")
    ] = False,
    predict: Annotated[
        bool, typer.Option("--predict", help="Predict step time and efficiency per strategy; submit nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable plan or prediction.")] = False,
    runs_dir: RunsDir = None,
) -> None:
    """Short measuring runs of a recipe on several node counts, in one allocation; `seis sweep-report` explains them."""
    from seiscli.launcher.sweep import parse_nodes, plan_sweep, write_sweep

    base = resolve(recipe, strategy=strategy, zero_stage=zero_stage, cp=cp, sets=set_)
    try:
        counts = parse_nodes(nodes)
        if predict:
            _predict(base, counts, step_time, as_json, runs_dir)
            return
        plan = plan_sweep(base, counts, mode=mode, steps=steps, warmup=warmup, step_time=step_time, root=runs_dir)
    except (ValueError, RecipeError) as e:
        fail(str(e))
    if dry_run:
        _show_plan(plan, as_json)
        return
    from seiscli.launcher.backends import get_backend
    from seiscli.launcher.backends.base import SubmitError

    try:
        sweep, runs = write_sweep(plan, runs_dir, recipe_source=find_recipe(recipe))
    except RecipeError as e:
        fail(str(e))
    try:
        job = get_backend(plan.sizes[-1].recipe.cluster.backend).submit(sweep)
    except SubmitError as e:
        sweep.update_submission(state="SUBMIT_FAILED", error=str(e))
        fail(f"submission failed: {e}", code=1)
    for size, run in zip(plan.sizes, runs, strict=True):
        # Not `job_id`: scheduler queries map a job to one run; the sweep's job is the sweep directory's.
        run.update_submission(sweep_job_id=job, state="PENDING", submitted=sweep.submission().get("submitted"))
        out.print(f"{size.nodes:>3} node(s): run {run.id}", highlight=False)
    ref = f"{sweep.path.parent.name}/{sweep.path.name}"
    out.print(
        f"sweep job {job} ({plan.max_nodes} node(s), limit {plan.limit_minutes} min): {sweep.path}\n"
        f"report: seis sweep-report {ref}",
        highlight=False,
    )


def _show_plan(plan: Any, as_json: bool) -> None:
    from rich.table import Table

    if as_json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n")
        return
    table = Table("nodes", "procs", "global batch", "grad accum", "steps", "est. s/step", "est. run", "step limit")
    for s in plan.sizes:
        table.add_row(
            str(s.nodes),
            str(s.recipe.cluster.world_size),
            str(s.recipe.global_batch),
            str(s.recipe.train.grad_accum),
            f"{plan.warmup} + {plan.timed}",
            f"{s.step_s:.3g}",
            f"{s.est_s / 60:.1f} min",
            f"{s.minutes} min",
        )
    out.print(table)
    out.print(
        f"{plan.mode} scaling; one allocation of {plan.max_nodes} node(s), time limit {plan.limit_minutes} min; "
        f"sizes run one after another as job steps, no checkpoints\n"
        f"step time: {plan.step_s:.3g} s at {plan.sizes[0].nodes} node(s) ({plan.step_source})\n"
        f"node-hours: ~{plan.node_hours_used:.2f} used by the sizes, ~{plan.node_hours_allocated:.2f} allocated "
        f"(the largest size's nodes for the whole sweep), at most {plan.node_hours_limit:.2f} at the time limit",
        highlight=False,
    )


def _predict(base: Any, counts: list[int], step_time: float | None, as_json: bool, runs_dir: Path | None) -> None:
    from rich.table import Table

    from seiscli.launcher.predict import ETA, Network, model_sizes, predict_table, published_check

    net = Network(gpus_per_node=base.cluster.gpus_per_node or 8)
    table = predict_table(base, counts, compute_s=step_time, net=net)
    sizes = model_sizes(base)
    check = published_check(base, net=net)
    if as_json:
        doc = {
            "recipe": base.name,
            "params": sizes.params,
            "network": net.__dict__,
            "overlap_eta": ETA,
            "published_check": check,
            "strategies": {k: [r.__dict__ for r in rows] for k, rows in table.items()},
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    per_gpu = base.train.micro_batch * base.train.grad_accum
    compute = next(iter(table.values()))[0].compute_s
    out.print(
        f"[bold]{base.name}[/]: {sizes.params / 1e6:.0f} M parameters, {sizes.blocks} blocks, "
        f"{sizes.train_flops_per_sample:.3g} training FLOPs per sample, {per_gpu} sample(s) per GPU per step; "
        f"compute {compute:.3f} s/step per GPU ({'--step-time' if step_time else 'FLOPs at 45.4 % MFU, H200'})",
        highlight=False,
    )
    out.print(
        f"network: NVLink {net.nvlink_bw / 1e9:.0f} GB/s busbw, alpha {net.nvlink_alpha * 1e6:.0f} us/hop; EFA "
        f"{net.efa_node_bw * 8 / 1e9:,.0f} Gbps per node x {net.efa_efficiency:.0%} = "
        f"{net.bandwidth(2) / 1e9:.0f} GB/s per GPU, alpha {net.efa_alpha * 1e6:.0f} us/hop; overlap eta "
        + ", ".join(f"{k} {v:g}" for k, v in ETA.items()),
        highlight=False,
    )
    t = Table("strategy", "nodes", "GPUs", "step s", "comm s (all)", "exposed ms", "samples/s", "efficiency",
              title=f"{base.name}: predicted per strategy (weak scaling, {per_gpu} sample(s) per GPU)")  # fmt: skip
    for strategy, rows in table.items():
        for r in rows:
            t.add_row(
                strategy if r is rows[0] else "",
                str(r.nodes),
                str(r.gpus),
                f"{r.step_s:.3f}",
                f"{r.comm_s:.3f}",
                f"{r.exposed_s * 1e3:.1f}",
                f"{r.gpus * per_gpu / r.step_s:,.1f}",
                _pct(r.efficiency),
            )
        t.add_section()
    out.print(t)
    _two_gpu_check(base)
    out.print(
        "published TGS figures (128 GPUs): the compute step time per GPU at which this model reproduces them, "
        f"against this recipe's {check['compute_s_recipe']:.3f} s:",
        highlight=False,
    )
    for key, label in (
        ("zero3_over_zero2_0.44", "ZeRO-3 / ZeRO-2 = 869 / 1,974 = 0.44"),
        ("fsdp2_over_zero2_0.93", "FSDP2 / ZeRO-2 = 1,833 / 1,974 = 0.93"),
        ("zero2_efficiency_0.90", "ZeRO-2 at 90 % efficiency 1 -> 16 nodes"),
        ("zero2_efficiency_0.95", "ZeRO-2 at 95 % efficiency 1 -> 16 nodes"),
    ):
        v = check[key]
        out.print(f"  {label}: {'unreachable' if v is None else f'{v:.3f} s'}", highlight=False)
    _measured_vs_predicted(base.name, runs_dir)


def _two_gpu_check(base: Any) -> None:
    """The one GPU measurement of several strategies (2 H200s over NVLink, BENCHMARKS.md), next to the model."""
    from seiscli.launcher.predict import H200X2_MEASURED, Network, model_sizes, predict_step

    sizes = model_sizes(base)
    if sizes.params != H200X2_MEASURED["params"]:
        return
    one = float(H200X2_MEASURED["one_gpu_s"])  # type: ignore[arg-type]
    cells = []
    for s, measured in H200X2_MEASURED["two_gpu_s"].items():  # type: ignore[union-attr]
        pred = predict_step(s, sizes, one, 1, 2, Network()).step_s
        cells.append(f"{s} {pred:.3f} vs {measured:.3f} ({pred / measured - 1:+.1%})")
    out.print(
        f"2 x H200 over NVLink, s/step predicted vs measured (1 GPU: {one:.3f} s; BENCHMARKS.md): " + "; ".join(cells),
        highlight=False,
    )


def _measured_vs_predicted(name: str, runs_dir: Path | None) -> None:
    """The newest sweep of this recipe, if any: its measured efficiency next to the model's."""
    from seiscli.launcher.sweep import find_sweep

    try:
        path = find_sweep(name, runs_dir)
    except LookupError:
        out.print(f"no sweep of {name} measured yet: no measurement to compare with", highlight=False)
        return
    points = _points_with_prediction(path, refresh=False)
    out.print(f"measured vs predicted, sweep {path}:", highlight=False)
    for p in points:
        out.print(
            f"  {p.nodes} node(s): step {_num(p.step_time_s)} s vs {_num(p.predicted_step_s)} s predicted, "
            f"efficiency {_pct(p.efficiency)} vs {_pct(p.predicted_efficiency)}",
            highlight=False,
        )


def _points_with_prediction(path: Path, refresh: bool = True) -> list[Any]:
    from seiscli.launcher.predict import model_sizes
    from seiscli.launcher.runs import Run
    from seiscli.launcher.sweep_report import add_predictions, load_points
    from seiscli.recipe import load_recipe

    _, points = load_points(path, refresh=refresh)
    done = [p for p in points if p.step_time_s]
    if done:
        recipe = load_recipe(str(Run(path.parent.parent.parent / done[0].run).recipe_path))
        sizes = model_sizes(recipe)
        add_predictions(points, recipe.parallelism.strategy, sizes.params, sizes.blocks)
    return points


@app.command("sweep-report")
def sweep_report(
    sweep: Annotated[str, typer.Argument(help="Sweep name (its newest), <name>/<timestamp> or directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    csv: Annotated[Path | None, typer.Option("--csv", help="CSV path [report.csv in the sweep directory].")] = None,
    png: Annotated[Path | None, typer.Option("--png", help="PNG path [report.png in the sweep directory].")] = None,
    runs_dir: RunsDir = None,
) -> None:
    """Efficiency per size and where the lost efficiency went (compute, comm, optimizer, data, stragglers)."""
    from seiscli.launcher.sweep import find_sweep
    from seiscli.launcher.sweep_report import ATTRIBUTION_TOLERANCE, report_rows, write_csv, write_png

    try:
        path = find_sweep(sweep, runs_dir)
        points = _points_with_prediction(path)
    except (LookupError, RecipeError, OSError, json.JSONDecodeError) as e:
        fail(str(e))
    csv_path = write_csv(points, csv or path / "report.csv")
    png_path = write_png(points, png or path / "report.png", f"scaling sweep {path.parent.name}/{path.name}")
    doc = json.loads((path / "sweep.json").read_text())
    if as_json:
        report = {
            "sweep": str(path),
            "mode": doc.get("mode"),
            "csv": str(csv_path),
            "png": str(png_path),
            "attribution_tolerance": ATTRIBUTION_TOLERANCE,
            "points": report_rows(points),
        }
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    _show_report(points, doc)
    out.print(f"csv: {csv_path}", highlight=False, soft_wrap=True)
    out.print(f"png: {png_path}", highlight=False, soft_wrap=True)


def _show_report(points: list[Any], doc: dict[str, Any]) -> None:
    from rich import box
    from rich.table import Column, Table

    from seiscli.launcher.sweep_report import ATTRIBUTION_TOLERANCE, NAMED_PARTS

    SHORT = {"optimizer": "optim.", "straggler": "stragg."}

    heads = ["nodes", "procs", "state", "s/step", "samples/s", "eff.", "pred.", "lost",
             *(SHORT.get(k, k) for k in NAMED_PARTS), "unexpl.", "AR/AG GB/s"]  # fmt: skip
    table = Table(
        *(Column(h, no_wrap=True) for h in heads),
        box=box.SIMPLE_HEAD,
        title=f"{doc.get('name')}: {doc.get('mode')} scaling, {doc.get('timed_steps')} timed steps after "
        f"{doc.get('warmup_steps')} warm-up; lost efficiency by part (percentage points)",
    )
    for p in points:
        bw = p.busbw_gb_s
        table.add_row(
            str(p.nodes),
            str(p.procs),
            p.state,
            _num(p.step_time_s),
            _num(p.samples_per_s, ".2f"),
            _pct(p.efficiency),
            _pct(p.predicted_efficiency),
            _pct(p.lost.get("total")),
            *(_pct(p.lost.get(k), signed=True) for k in NAMED_PARTS),
            _pct(p.lost.get("other"), signed=True),
            f"{bw['all_reduce']:.2f}/{bw.get('all_gather', 0):.2f}" if "all_reduce" in bw else "-",
        )
    # Fifteen columns: wider than a default 80-column pipe, so never narrower than 150.
    from rich.console import Console

    Console(width=max(out.width, 150), force_terminal=out.is_terminal).print(table)
    for p in points:
        if p.reason:
            color = "yellow" if p.state == "COMPLETED" else "red"
            out.print(f"[{color}]{p.nodes} node(s) {p.state}[/]: {p.reason}", highlight=False)
        if p.comm_split is False:
            out.print(f"{p.nodes} node(s): fsdp2/zero3 communicate inside forward and backward: comm counts as compute")
    out.print(
        f"lost = 1 - efficiency, split into parts that add up to it; 'unexpl.' is time no phase covers "
        f"(tolerance {ATTRIBUTION_TOLERANCE:.0%}). Per-size time per part: CSV and PNG.",
        highlight=False,
    )
