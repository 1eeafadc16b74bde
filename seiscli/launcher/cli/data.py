"""`seis data ...`: write synthetic MDIO volumes, ingest SEG-Y, inspect volumes, measure the loader.

Mounted by `seiscli/launcher/cli/__init__.py`. numpy, zarr and mdio are imported inside the commands only, so
`seis --help` stays fast on a login node without them.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, help="Create and inspect seismic volumes (MDIO v1 / Zarr v3).")
out = Console()

EndpointOpt = Annotated[str | None, typer.Option("--endpoint-url", help="S3-compatible endpoint (object stores).")]
RegionOpt = Annotated[str | None, typer.Option("--region", help="Object-store region.")]


def _fail(message: str) -> NoReturn:
    from rich.markup import escape

    from seiscli.launcher.cli.common import fail

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


def _stored_bytes(uri: str, options: dict[str, Any] | None) -> int | None:
    from seiscli.data.store import stored_bytes

    try:
        return stored_bytes(uri, options)
    except OSError:  # listing may be denied where reading is allowed
        return None


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
    compressor: Annotated[
        str, typer.Option("--compressor", help="zstd (MDIO's default), lz4, zstd-raw, lz4-raw or none.")
    ] = "zstd",
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
    from seiscli.data.synth import fault_labels, synthetic_volume
    from seiscli.data.write import FAULTS, write_volume

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
        labels={FAULTS: fault_labels(shape, seed)},  # for the fault-segmentation probe of `seis eval`
    )
    t2 = time.perf_counter()
    stored = _stored_bytes(path, options)
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


def _crop_for(crop: tuple[int, int, int] | None, recipe: str | None) -> tuple[int, int, int] | None:
    """--crop, or a recipe's data.crop (a bundled recipe name or a YAML path)."""
    if crop is not None and recipe is not None:
        _fail("--crop and --recipe: give one of them")
    if crop is not None:
        if min(crop) < 1:
            _fail(f"--crop {' '.join(map(str, crop))}: every axis must be >= 1")
        return crop
    if recipe is None:
        return None
    from seiscli.recipe import RecipeError, load_recipe

    try:
        return tuple(load_recipe(recipe).data.crop)  # type: ignore[return-value]
    except (RecipeError, OSError) as e:
        _fail(f"--recipe {recipe}: {e}")


@app.command()
def inspect(
    uri: Annotated[str, typer.Argument(help="MDIO dataset: local path or s3://bucket/key.mdio.")],
    crop: Annotated[
        tuple[int, int, int] | None,
        typer.Option("--crop", help="Report read amplification and GETs per crop of this shape (random origins)."),
    ] = None,
    recipe: Annotated[str | None, typer.Option("--recipe", help="Same, for this recipe's data.crop.")] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Shape, chunks, dtype, size and statistics of a volume; with --crop/--recipe, what a random crop costs."""
    _require("numpy", "zarr")
    import math

    from rich.table import Table

    from seiscli.data.volume import VolumeError, open_volume

    crop = _crop_for(crop, recipe)
    try:
        vol = open_volume(uri, endpoint_url=endpoint_url, region=region)
    except (VolumeError, OSError) as e:
        _fail(str(e))
    info = vol.info
    n_chunks = math.prod(math.ceil(n / c) for n, c in zip(info.shape, info.chunks, strict=True))
    stored = _stored_bytes(uri, vol.storage_options)
    table = Table(title=uri, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("variable", info.variable)
    table.add_row("shape (inline, crossline, time)", " x ".join(map(str, info.shape)))
    table.add_row("chunks", f"{' x '.join(map(str, info.chunks))} ({n_chunks} chunks)")
    if info.shards:
        n_shards = math.prod(math.ceil(n / c) for n, c in zip(info.shape, info.shards, strict=True))
        table.add_row("shards", f"{' x '.join(map(str, info.shards))} ({n_shards} objects)")
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
    if crop is not None:
        from seiscli.data.layout import crop_cost

        shown = "x".join(map(str, crop))
        if any(c > n for c, n in zip(crop, info.shape, strict=True)):
            table.add_row(f"crop {shown}", f"larger than the volume {'x'.join(map(str, info.shape))}")
        else:
            order = vol.shard_order() or "c"
            cost = crop_cost(info.shape, crop, info.chunks, info.shards, order=order)
            table.add_row(f"crop {shown} (random origins)", f"read amplification {cost.amplification:.3f}")
            gets = f"{cost.gets:,.0f} GETs per crop, {_human(cost.mean_get_bytes)} each on average (decoded size)"
            if info.shards:
                gets += f"; {cost.shards:.0f} shards touched, {cost.full_shards:.0f} read whole; {order} order"
            table.add_row("requests", gets)
    out.print(table)


@app.command()
def rechunk(
    paths: Annotated[list[str], typer.Argument(help="MDIO volume(s), then the destination (DEST.mdio or a folder).")],
    chunks: Annotated[
        tuple[int, int, int], typer.Option("--chunks", help="Inner chunk shape: the unit a crop reads.")
    ] = (32, 32, 32),
    shards: Annotated[
        tuple[int, int, int],
        typer.Option("--shards", help="Shard (object) shape, a multiple of --chunks; 0 = the whole axis."),
    ] = (64, 64, 0),
    compressor: Annotated[str, typer.Option("--compressor", help="zstd, lz4, zstd-raw, lz4-raw or none.")] = "lz4",
    spread: Annotated[
        int, typer.Option("--spread", help="Into a folder: under N hashed prefixes (DEST/hh/NAME.mdio); 0 = off.")
    ] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing datasets.")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Rewrite volumes in the training layout for object storage: Zarr v3 shards of small inner chunks, so a crop
    at any origin reads little it does not use, each row of inner chunks along time one range GET."""
    _require("numpy")
    from seiscli.data.write import COMPRESSORS  # zarr and mdio load inside its functions, after the checks

    if len(paths) < 2:
        _fail("rechunk needs at least one volume and a destination: seis data rechunk SRC.mdio [...] DEST")
    if min(chunks) < 1:
        _fail(f"--chunks {' '.join(map(str, chunks))}: every axis must be >= 1")
    if any(s < 0 or s % c for s, c in zip(shards, chunks, strict=True)):
        _fail(f"--shards {' '.join(map(str, shards))}: every axis must be a multiple of --chunks (0: the whole axis)")
    if compressor not in COMPRESSORS:
        _fail(f"--compressor {compressor!r}: allowed {', '.join(COMPRESSORS)}")
    if spread < 0:
        _fail(f"--spread {spread}: must be >= 0")
    _require("zarr", "mdio")
    from seiscli.data.rechunk import rechunk as do_rechunk
    from seiscli.data.rechunk import spread_uri
    from seiscli.data.store import exists, storage_options_for
    from seiscli.data.volume import VolumeError

    sources, dest = paths[:-1], paths[-1].rstrip("/")
    if len(sources) == 1 and dest.endswith(".mdio") and not spread:
        targets = [dest]
    else:
        names = [s.rstrip("/").rsplit("/", 1)[-1] for s in sources]
        names = [n if n.endswith(".mdio") else f"{n}.mdio" for n in names]
        if len(set(names)) != len(names):
            _fail(f"sources share a name ({', '.join(names)}); rechunk them into separate folders")
        targets = [spread_uri(dest, n, spread) for n in names]
    for target in targets:
        if not overwrite and exists(target, storage_options_for(target, endpoint_url=endpoint_url, region=region)):
            _fail(f"{target} already exists; pass --overwrite to replace it")
    for src, target in zip(sources, targets, strict=True):
        t0 = time.perf_counter()
        try:
            w = do_rechunk(
                src, target, chunks=chunks, shards=shards, compressor=compressor, overwrite=overwrite,
                src_options=storage_options_for(src, endpoint_url=endpoint_url, region=region),
                dest_options=storage_options_for(target, endpoint_url=endpoint_url, region=region),
            )  # fmt: skip
        except (VolumeError, ValueError, OSError) as e:
            _fail(f"{src}: {e}")
        stored = _stored_bytes(target, storage_options_for(target, endpoint_url=endpoint_url, region=region))
        size = f", {_human(stored)} stored" if stored is not None else ""
        out.print(
            f"rechunked {src} -> {target}: {'x'.join(map(str, w.shape))}, shards {'x'.join(map(str, w.shards))} of "
            f"{'x'.join(map(str, w.chunks))}, {compressor}{size}, {time.perf_counter() - t0:.1f} s",
            highlight=False,
        )


@app.command()
def ingest(
    paths: Annotated[list[str], typer.Argument(help="SEG-Y file(s), then the destination (DEST.mdio, or a folder).")],
    chunks: Annotated[
        tuple[int, int, int] | None, typer.Option("--chunks", help="Chunk shape (MDIO's default 128 128 128).")
    ] = None,
    inline_byte: Annotated[int, typer.Option("--inline-byte", help="Trace-header byte of the inline number.")] = 189,
    crossline_byte: Annotated[
        int, typer.Option("--crossline-byte", help="Trace-header byte of the crossline number.")
    ] = 193,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing datasets.")] = False,
    training_layout: Annotated[
        bool,
        typer.Option(
            "--training-layout", help="Write the training layout for object storage (as `seis data rechunk`)."
        ),
    ] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Convert post-stack 3D SEG-Y to MDIO v1 with multidimio (PostStack3DTime): `seis data ingest A.segy B.segy
    s3://bucket/surveys/` writes A.mdio and B.mdio there. With --training-layout MDIO's import goes to a local
    temporary folder and is then rewritten to the destination in the training layout."""
    _require("numpy", "zarr", "mdio", "segy")
    if len(paths) < 2:
        _fail("ingest needs at least one SEG-Y file and a destination: seis data ingest IN.segy [...] DEST")
    if chunks is not None and min(chunks) < 1:
        _fail(f"--chunks {' '.join(map(str, chunks))}: every axis must be >= 1")
    for name, byte in (("--inline-byte", inline_byte), ("--crossline-byte", crossline_byte)):
        if not 1 <= byte <= 237:
            _fail(f"{name} {byte}: a trace-header byte is 1..237 (4-byte integer)")
    from seiscli.data.ingest import destinations, ingest_segy
    from seiscli.data.store import exists, storage_options_for
    from seiscli.data.volume import open_volume

    sources, dest = paths[:-1], paths[-1]
    try:
        targets = destinations(sources, dest)
    except ValueError as e:
        _fail(str(e))
    for src in sources:
        if not exists(src, storage_options_for(src, endpoint_url=endpoint_url, region=region)):
            _fail(f"{src}: no such SEG-Y file")
    for target in targets:
        if not overwrite and exists(target, storage_options_for(target, endpoint_url=endpoint_url, region=region)):
            _fail(f"{target} already exists; pass --overwrite to replace it")
    if training_layout and chunks is not None:
        _fail("--chunks and --training-layout: the training layout sets its own chunks (see seis data rechunk)")
    for src, target in zip(sources, targets, strict=True):
        options = storage_options_for(target, endpoint_url=endpoint_url, region=region)
        t0 = time.perf_counter()
        try:
            if training_layout:
                import tempfile

                from seiscli.data.rechunk import rechunk as do_rechunk

                with tempfile.TemporaryDirectory(prefix="seis-ingest-") as tmp:
                    staged = f"{tmp}/staged.mdio"
                    ingest_segy(
                        src,
                        staged,
                        inline_byte=inline_byte,
                        crossline_byte=crossline_byte,
                        storage_options=storage_options_for(src, endpoint_url=endpoint_url, region=region),
                    )
                    do_rechunk(staged, target, overwrite=overwrite, dest_options=options)
            else:
                ingest_segy(
                    src,
                    target,
                    chunks=chunks,
                    inline_byte=inline_byte,
                    crossline_byte=crossline_byte,
                    overwrite=overwrite,
                    storage_options=options,
                )
        except (ValueError, OSError) as e:
            _fail(f"{src}: {e}")
        info = open_volume(target, storage_options=options).info
        live = int(open_volume(target, storage_options=options).live_mask().sum())
        out.print(
            f"ingested {src} -> {target}: amplitude {'x'.join(map(str, info.shape))} {info.dtype}, "
            f"chunks {'x'.join(map(str, info.chunks))}"
            + (f" in shards {'x'.join(map(str, info.shards))}" if info.shards else "")
            + f", {live:,} live traces, {time.perf_counter() - t0:.1f} s",
            highlight=False,
        )


@app.command()
def bench(
    uris: Annotated[list[str], typer.Argument(help="MDIO datasets or patterns (s3://bucket/prefix/*.mdio).")],
    crop: Annotated[tuple[int, int, int], typer.Option("--crop", help="Crop shape.")] = (128, 128, 128),
    micro_batch: Annotated[int, typer.Option("--micro-batch", help="Samples per batch.")] = 1,
    workers: Annotated[int, typer.Option("--workers", help="Loader worker processes.")] = 2,
    prefetch: Annotated[int, typer.Option("--prefetch", help="Batches prefetched per worker.")] = 2,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Chunk GETs in flight per worker.")] = 32,
    client: Annotated[str, typer.Option("--client", help="obstore or s3fs (s3:// only).")] = "obstore",
    seconds: Annotated[float, typer.Option("--seconds", help="Measured time after warm-up.")] = 20.0,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Measure the training loader on real volumes: delivered bytes/s and samples/s, per worker."""
    _require("numpy", "zarr", "torch")
    from rich.live import Live
    from rich.table import Table

    from seiscli.data.loader_bench import bench_loader, bench_recipe
    from seiscli.data.store import S3_CLIENTS
    from seiscli.data.volume import VolumeError
    from seiscli.recipe import RecipeError

    if client not in S3_CLIENTS:
        _fail(f"--client {client!r}: allowed {', '.join(S3_CLIENTS)}")
    if min(crop) < 1 or micro_batch < 1 or workers < 0 or prefetch < 1 or concurrency < 1 or seconds <= 0:
        _fail("--crop axes, --micro-batch, --prefetch, --concurrency must be >= 1, --workers >= 0, --seconds > 0")
    try:
        recipe = bench_recipe(
            uris,
            crop=crop,
            micro_batch=micro_batch,
            workers=workers,
            prefetch=prefetch,
            concurrency=concurrency,
            client=client,
            endpoint_url=endpoint_url,
            region=region,
        )
    except RecipeError as e:
        _fail(str(e))

    def view(p: dict[str, Any]) -> Table:
        t = Table(title=f"loader on {', '.join(uris)}: {p['elapsed_s']:.0f}/{seconds:.0f} s", title_justify="left")
        for col in ("worker", "MiB/s", "fetched MiB/s", "samples/s", "busy"):
            t.add_column(col, justify="right")
        for w, r in sorted(p["workers"].items()):
            t.add_row(
                str(w),
                f"{r['bytes_per_s'] / 2**20:.1f}",
                f"{r['read_bytes_per_s'] / 2**20:.1f}",
                f"{r['samples_per_s']:.2f}",
                f"{r['busy']:.0%}",
            )
        t.add_row(
            "all",
            f"{p['bytes_per_s'] / 2**20:.1f}",
            f"{p['read_bytes_per_s'] / 2**20:.1f}",
            f"{p['samples_per_s']:.2f}",
            f"retries {p['retries']}",
        )
        return t

    start = {"elapsed_s": 0, "bytes_per_s": 0, "read_bytes_per_s": 0, "samples_per_s": 0, "retries": 0, "workers": {}}
    live = Live(view(start), console=out)
    try:
        with live:
            result = bench_loader(recipe, seconds=seconds, progress=lambda p: live.update(view(p)))
        if not out.is_terminal:
            out.line()  # rich ends a terminal's live display with a newline, not a pipe's
    except (VolumeError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    out.print(
        f"{result.bytes_per_s / 2**20:.1f} MiB/s decoded ({result.samples_per_s:.2f} samples/s of "
        f"{'x'.join(map(str, crop))}) over {result.seconds:.1f} s; {result.read_bytes_per_s / 2**20:.1f} MiB/s "
        f"fetched ({result.bytes_read / 2**20:.1f} MiB as stored, {result.requests} GETs), {result.retries} retries; "
        f"{result.bytes_per_cpu_s / 2**20:.1f} MiB decoded per loader CPU-second",
        highlight=False,
    )
