"""`seis data ...`: write synthetic MDIO volumes and inspect volumes.

Mounted by `seiscli/cli.py`. numpy, zarr and mdio are imported inside the commands only, so
`seis --help` stays fast on a login node without them.
"""

from __future__ import annotations

import time
from typing import Annotated, NoReturn

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Create and inspect seismic volumes (MDIO v1 / Zarr v3).")
out = Console()

EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (object stores).")]
RegionOpt = Annotated[str | None, typer.Option("--region", help="Object-store region.")]


def _fail(message: str) -> NoReturn:
    from rich.markup import escape

    from seiscli.cli import fail

    fail(escape(message))  # paths and extras like seis[train] are text, not rich markup


def _require(*modules: str) -> None:
    """A login node may have the launcher alone; say what to install instead of a traceback."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        _fail(f"`seis data` needs {', '.join(missing)}: install the trainer extras (pip install 'seis[train]')")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _stored_bytes(uri: str) -> int | None:
    from seiscli.data.store import is_remote, local_path

    if is_remote(uri):
        return None
    import os

    total = 0
    for root, _, files in os.walk(local_path(uri)):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


@app.command()
def synth(
    path: Annotated[str, typer.Argument(help="Where to write the MDIO dataset (directory, or s3://...).")],
    shape: Annotated[
        tuple[int, int, int], typer.Option("--shape", help="Inline, crossline and time samples: --shape 96 128 160.")
    ],
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the structure and noise.")] = 0,
    chunks: Annotated[
        tuple[int, int, int], typer.Option("--chunks", help="Chunk shape; 128^3 float32 = 8 MiB per chunk.")
    ] = (128, 128, 128),
    compressor: Annotated[str, typer.Option("--compressor", help="zstd (MDIO's default), lz4 or none.")] = "zstd",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing dataset.")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Write a synthetic post-stack volume (layers, folds, faults, Ricker wavelet, noise) as MDIO."""
    _require("numpy", "zarr", "mdio")
    from seiscli.data.write import COMPRESSORS

    if min(shape) < 1:
        _fail(f"--shape {' '.join(map(str, shape))}: every axis must be >= 1")
    if min(chunks) < 1:
        _fail(f"--chunks {' '.join(map(str, chunks))}: every axis must be >= 1")
    if compressor not in COMPRESSORS:
        _fail(f"--compressor {compressor!r}: allowed {', '.join(COMPRESSORS)}")

    import mdio.api.io  # noqa: F401  (imported up front so the timings below are generation and writing only)

    from seiscli.data.store import exists, storage_options_for
    from seiscli.data.synth import synthetic_volume
    from seiscli.data.write import write_volume

    options = storage_options_for(path, endpoint_url=endpoint_url, region=region)
    if not overwrite and exists(path, options):
        _fail(f"{path} already exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    volume = synthetic_volume(shape, seed)
    t1 = time.perf_counter()
    w = write_volume(
        path,
        volume,
        chunks=chunks,
        compressor=compressor,
        name=f"synthetic-seed{seed}",  # type: ignore[arg-type]
        overwrite=overwrite,
        storage_options=options,
    )
    t2 = time.perf_counter()
    stored = _stored_bytes(path)
    s = w.stats
    out.print(
        f"wrote {path}: MDIO v1 PostStack3DTime, amplitude {'x'.join(map(str, w.shape))} float32, "
        f"chunks {'x'.join(map(str, w.chunks))}, {w.compressor}, {_human(volume.nbytes)}"
        + (f" ({_human(stored)} stored)" if stored is not None else ""),
        highlight=False,
    )
    out.print(
        f"stats: mean {s.mean:.4g}, std {s.std:.4g}, min {s.min:.4g}, max {s.max:.4g}, "
        f"median {s.median:.4g}, robust std {s.robust_std:.4g}; "
        f"generated in {t1 - t0:.2f} s, written in {t2 - t1:.2f} s",
        highlight=False,
    )


@app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help="MDIO dataset: local path or s3://bucket/key.mdio.")],
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Shape, chunks, dtype, size and statistics of a volume."""
    _require("numpy", "zarr")
    import math

    from rich.table import Table

    from seiscli.data.volume import VolumeError, open_volume

    try:
        vol = open_volume(uri, endpoint_url=endpoint_url, region=region)
    except VolumeError as e:
        _fail(str(e))
    info = vol.info
    n_chunks = math.prod(math.ceil(n / c) for n, c in zip(info.shape, info.chunks, strict=True))
    stored = _stored_bytes(uri)
    table = Table(title=uri, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("variable", info.variable)
    table.add_row("shape (inline, crossline, time)", " x ".join(map(str, info.shape)))
    table.add_row("chunks", f"{' x '.join(map(str, info.chunks))} ({n_chunks} chunks)")
    table.add_row("dtype", info.dtype)
    table.add_row("size", _human(info.nbytes))
    if stored is not None:
        table.add_row("stored", f"{_human(stored)} (ratio {info.nbytes / max(stored, 1):.2f})")
    if info.has_mask:
        mask = vol.live_mask()
        table.add_row("live traces", f"{int(mask.sum()):,} of {mask.size:,} ({mask.mean():.1%})")
    else:
        table.add_row("live traces", "no trace_mask (all assumed live)")
    s = info.stats
    if s is None:
        table.add_row("statistics", "none stored (statsV1 missing)")
    else:
        table.add_row("count", f"{s.count:,}")
        table.add_row("mean / std", f"{s.mean:.6g} / {s.std:.6g}")
        table.add_row("min / max", f"{s.min:.6g} / {s.max:.6g}")
        if s.has_histogram:
            table.add_row("median / robust std", f"{s.median:.6g} / {s.robust_std:.6g}")
        centre, scale = s.centre_scale()
        sign = "-" if centre >= 0 else "+"
        table.add_row("loader normalisation", f"(x {sign} {abs(centre):.6g}) / {scale:.6g}")
    out.print(table)
