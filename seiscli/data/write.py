"""Write a 3D post-stack volume as an MDIO v1 dataset (Zarr v3), with statsV1 and a live-trace mask.

The layout comes from MDIO's own `PostStack3DTime` template (variables `amplitude`, `trace_mask`,
dimension coordinates `inline`/`crossline`/`time`, `cdp_x`/`cdp_y`), created the way MDIO's SEG-Y
importer does it: `to_mdio(compute=False)` writes the metadata, coordinates and mask go through
xarray, and the big variable is written slab by slab with zarr directly (no dask graph).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from seiscli.data.stats import StatsAccumulator, VolumeStats
from seiscli.data.store import exists, remove, storage_options_for

Shape3 = tuple[int, int, int]
# "zstd"/"lz4": Blosc with that codec, clevel 5, byte shuffle (what MDIO's schema gives: shuffle None becomes
# zarr's default "shuffle" for 4-byte floats); "zstd-raw"/"lz4-raw": the plain codec, no Blosc, no shuffle.
# Decode cost and ratio of each: BENCHMARKS.md (codecs); the training layout uses "lz4".
Compressor = Literal["zstd", "lz4", "zstd-raw", "lz4-raw", "none"]
COMPRESSORS: tuple[str, ...] = ("zstd", "lz4", "zstd-raw", "lz4-raw", "none")

# 128^3 float32 = 8 MiB per chunk: MDIO's post-stack default, and a size where one S3 GET runs near full
# bandwidth while a random crop of a few hundred samples per axis reads at most ~1.5-2x what it needs.
DEFAULT_CHUNKS: Shape3 = (128, 128, 128)
VARIABLE = "amplitude"
MASK = "trace_mask"
FAULTS = "fault_mask"  # synthetic volumes: uint8 voxel labels of the fault zones, beside the amplitudes
TRACE_SPACING_M = 25.0
SAMPLE_INTERVAL_MS = 4


@dataclass(frozen=True)
class Written:
    uri: str
    shape: Shape3
    chunks: Shape3
    compressor: str
    stats: VolumeStats
    live_traces: int
    shards: Shape3 | None = None


def _check(shape: Shape3, chunks: Shape3, compressor: str, shards: Shape3 | None = None) -> Shape3:
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape {tuple(shape)}: need 3 axes, each >= 1")
    if len(chunks) != 3 or min(chunks) < 1:
        raise ValueError(f"chunks {tuple(chunks)}: need 3 axes, each >= 1")
    if compressor not in COMPRESSORS:
        raise ValueError(f"compressor {compressor!r}: allowed {', '.join(COMPRESSORS)}")
    if shards is not None:
        if len(shards) != 3 or any(s < 1 or s % c for s, c in zip(shards, chunks, strict=True)):
            raise ValueError(f"shards {tuple(shards)}: need 3 axes, each a multiple of the chunks {tuple(chunks)}")
        return tuple(chunks)  # type: ignore[return-value]  (inner chunks keep their shape; shards pad the edges)
    return tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))  # type: ignore[return-value]


def zarr_compressors(compressor: str) -> list[Any] | None:
    """The Zarr v3 codecs after `bytes` for `compressor` (None: no compression)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if compressor == "none":
        return None
    if compressor == "zstd-raw":
        return [ZstdCodec(level=1)]
    if compressor == "lz4-raw":
        from numcodecs.zarr3 import LZ4

        return [LZ4(acceleration=1)]
    return [BloscCodec(cname=compressor, clevel=5, shuffle="shuffle")]


def write_volume(
    uri: str,
    data: np.ndarray,
    *,
    chunks: Shape3 = DEFAULT_CHUNKS,
    live_mask: np.ndarray | None = None,
    compressor: Compressor = "zstd",
    shards: Shape3 | None = None,
    name: str = "volume",
    attributes: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    labels: dict[str, np.ndarray] | None = None,
) -> Written:
    """Write `data` (inline, crossline, time) to `uri`. Dead traces (live_mask False) are stored as the fill
    value NaN, like MDIO's SEG-Y import, and are left out of the statistics. With `shards` the amplitudes are
    Zarr v3 sharded: objects of that shape holding inner chunks of `chunks` (seiscli.data.layout). `labels`:
    extra voxel variables of the same shape (e.g. {FAULTS: uint8 mask}), stored with the amplitudes'
    dimensions and (inner) chunks."""
    from mdio.builder.schemas.v1.stats import SummaryStatistics

    if data.ndim != 3:
        raise ValueError(f"data has {data.ndim} axes; a volume needs 3 (inline, crossline, time)")
    shape: Shape3 = tuple(int(s) for s in data.shape)  # type: ignore[assignment]
    if live_mask is None:
        live_mask = np.ones(shape[:2], dtype=bool)
    live_mask = np.asarray(live_mask, dtype=bool)
    for label, values in (labels or {}).items():
        if values.shape != shape:  # before anything is written
            raise ValueError(f"label {label!r} has shape {values.shape}; the volume is {shape}")
    array, chunks = create_volume(
        uri, shape, live_mask, chunks=chunks, compressor=compressor, shards=shards, name=name,
        attributes=attributes, overwrite=overwrite, storage_options=storage_options,
    )  # fmt: skip
    from seiscli.data.shards import write_region

    nz = shape[0]
    rows = (array.shards or chunks)[0]  # whole shards per write: each object is written once
    acc = _stats_accumulator(data, live_mask, rows)
    for z0 in range(0, nz, rows):
        z1 = min(nz, z0 + rows)
        slab = data[z0:z1]
        live = live_mask[z0:z1]
        if not live.all():
            slab = np.where(live[:, :, None], slab, np.float32(np.nan)).astype(np.float32, copy=False)
        acc.update(slab[live])
        write_region(array, (z0, 0, 0), slab, compressor)
    if labels:
        import zarr

        group = zarr.open_group(uri, mode="r+", storage_options=storage_options or storage_options_for(uri))
        for label, values in labels.items():
            _write_label(group, label, values, shape, chunks)
    stats = acc.result()
    # Same encoding as MDIO's importer (a JSON string), validated against MDIO's schema.
    array.attrs["statsV1"] = SummaryStatistics.model_validate(stats.to_stats_v1()).model_dump_json()
    return Written(
        uri=uri, shape=shape, chunks=chunks, compressor=compressor, stats=stats, live_traces=int(live_mask.sum()),
        shards=tuple(array.shards) if array.shards else None,  # type: ignore[arg-type]
    )  # fmt: skip


def create_volume(
    uri: str,
    shape: Shape3,
    live_mask: np.ndarray,
    *,
    chunks: Shape3 = DEFAULT_CHUNKS,
    compressor: str = "zstd",
    shards: Shape3 | None = None,
    name: str = "volume",
    attributes: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Any, Shape3]:
    """An MDIO v1 dataset at `uri` with coordinates and the trace mask written and the amplitude array empty, for
    the caller to fill; returns (amplitude array, its chunk shape)."""
    import zarr
    from mdio.api.io import to_mdio
    from mdio.builder.schemas.compressors import Blosc, BloscCname
    from mdio.builder.template_registry import get_template
    from mdio.builder.xarray_builder import to_xarray_dataset
    from upath import UPath

    if shards is not None:
        from seiscli.data.layout import resolve_shards

        shards = resolve_shards(shards, shape, chunks)
    chunks = _check(shape, chunks, compressor, shards)
    if live_mask.shape != shape[:2]:
        raise ValueError(f"live_mask shape {live_mask.shape} != (inline, crossline) {shape[:2]}")
    storage_options = storage_options or storage_options_for(uri)
    if exists(uri, storage_options):
        if not overwrite:
            raise FileExistsError(f"{uri} already exists (pass overwrite to replace it)")
        remove(uri, storage_options)

    template = get_template("PostStack3DTime")
    template.full_chunk_shape = tuple(min(c, s) for c, s in zip(shards or chunks, shape, strict=True))
    dataset = template.build_dataset(name=name, sizes=shape)
    for var in dataset.variables:
        if var.name == VARIABLE and compressor in ("zstd", "lz4"):
            var.compressor = Blosc(cname=BloscCname(compressor), clevel=5)
    if attributes:
        dataset.metadata.attributes = {**(dataset.metadata.attributes or {}), **attributes}
    xds = to_xarray_dataset(dataset)
    if compressor not in ("zstd", "lz4"):  # MDIO's schema has neither "none" nor plain codecs
        xds[VARIABLE].encoding["compressors"] = zarr_compressors(compressor)
    nz, ny, nx = shape
    xds["inline"].values[:] = np.arange(1, nz + 1, dtype=np.int32)
    xds["crossline"].values[:] = np.arange(1, ny + 1, dtype=np.int32)
    xds["time"].values[:] = np.arange(nx, dtype=np.int32) * SAMPLE_INTERVAL_MS
    xds["cdp_x"].data = np.broadcast_to(np.arange(nz)[:, None] * TRACE_SPACING_M, (nz, ny)).astype(np.float64)
    xds["cdp_y"].data = np.broadcast_to(np.arange(ny)[None, :] * TRACE_SPACING_M, (nz, ny)).astype(np.float64)
    xds[MASK].data = live_mask

    path = UPath(uri, **(storage_options or {}))
    to_mdio(xds, path, mode="w", compute=False)
    to_mdio(xds[["inline", "crossline", "time", "cdp_x", "cdp_y", MASK]], path, mode="r+", compute=True)

    group = zarr.open_group(uri, mode="r+", storage_options=storage_options)
    array = group[VARIABLE]
    if shards is not None:
        # MDIO's builder knows no sharding: the amplitude array is made again, sharded, with the same metadata.
        array = group.create_array(
            VARIABLE,
            shape=shape,
            dtype=array.dtype,
            chunks=chunks,
            shards=shards,
            compressors=zarr_compressors(compressor),
            fill_value=array.metadata.fill_value,
            dimension_names=array.metadata.dimension_names,
            attributes=dict(array.attrs),
            overwrite=True,
        )
    return array, chunks


def _write_label(group: Any, name: str, values: np.ndarray, shape: Shape3, chunks: Shape3) -> None:
    if values.shape != shape:
        raise ValueError(f"label {name!r} has shape {values.shape}; the volume is {shape}")
    arr = group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=values.dtype,
        fill_value=0,
        dimension_names=("inline", "crossline", "time"),  # xarray/MDIO readers see it as a data variable
    )
    arr[...] = values


def _stats_accumulator(data: np.ndarray, live_mask: np.ndarray, rows: int) -> StatsAccumulator:
    """The histogram range needs the live min/max before the first slab is binned."""
    lo, hi = np.inf, -np.inf
    for z0 in range(0, data.shape[0], rows):
        live = data[z0 : z0 + rows][live_mask[z0 : z0 + rows]]
        if live.size:
            lo, hi = min(lo, float(live.min())), max(hi, float(live.max()))
    if not np.isfinite(lo):
        lo, hi = 0.0, 1.0
    return StatsAccumulator(lo, hi)
