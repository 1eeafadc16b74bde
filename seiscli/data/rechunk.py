"""Rewrite an MDIO volume in the training layout (seiscli.data.layout): Zarr v3 shards of small inner chunks.

The copy streams one shard column (shards[0] x shards[1] x every sample) at a time, so memory stays at ~100 MB
whatever the survey size, and each shard object is written once. Coordinates, the trace mask, the dataset's
attributes and the statistics (statsV1, copied: the values are the same) carry over; the result is a plain MDIO v1
dataset that MDIO and any Zarr v3 reader open.

Request rate: S3 serves >= 5,500 GET/s per partitioned prefix and splits prefixes by load. Keys of one volume
differ right after `amplitude/c/` (the shard index), so S3 can split a hot volume there; across volumes,
`spread_uri` puts each under one of N short hashed prefixes (DEST/3f/name.mdio) so a dataset's volumes do not
sort into one key range and start on separate partitions. Globs such as DEST/*/*.mdio find them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from seiscli.data.layout import INNER, SHARD, Shape3
from seiscli.data.write import VARIABLE, Written, create_volume


def spread_uri(dest: str, name: str, prefixes: int) -> str:
    """DEST/<hh>/<name>: hh is a stable hash of the name, modulo `prefixes` (0 or 1: DEST/<name>)."""
    if prefixes <= 1:
        return f"{dest.rstrip('/')}/{name}"
    h = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big") % prefixes
    width = max(2, len(f"{prefixes - 1:x}"))
    return f"{dest.rstrip('/')}/{h:0{width}x}/{name}"


def rechunk(
    src: str,
    dest: str,
    *,
    chunks: Shape3 = INNER,
    shards: Shape3 = SHARD,
    compressor: str = "lz4",
    overwrite: bool = False,
    src_options: dict[str, Any] | None = None,
    dest_options: dict[str, Any] | None = None,
) -> Written:
    import numpy as np

    from seiscli.data.volume import open_volume

    vol = open_volume(src, storage_options=src_options)
    shape = vol.shape
    mask = vol.live_mask()
    ds_attrs = vol.info.attributes
    array, chunks = create_volume(
        dest, shape, mask, chunks=chunks, compressor=compressor, shards=shards,
        name=str(ds_attrs.get("name") or "volume"), attributes=ds_attrs.get("attributes"),
        overwrite=overwrite, storage_options=dest_options,
    )  # fmt: skip
    from seiscli.data.shards import write_region

    stats_attr = vol._data().attrs.get("statsV1")
    nz, ny, nx = shape
    sz, sy = array.shards[:2]
    slab = np.empty((sz, sy, nx), dtype=vol.dtype)
    for z0 in range(0, nz, sz):
        for y0 in range(0, ny, sy):
            box = slab[: min(sz, nz - z0), : min(sy, ny - y0)]
            vol.read_into((z0, y0, 0), box)
            write_region(array, (z0, y0, 0), box, compressor)
    if stats_attr is not None:
        array.attrs["statsV1"] = stats_attr
    out = open_volume(dest, storage_options=dest_options)
    if out.info.variable != VARIABLE or out.shape != shape:
        raise RuntimeError(f"{dest}: the rewritten volume reads back as {out.info.variable} {out.shape}")
    return Written(
        uri=dest, shape=shape, chunks=chunks, compressor=compressor, stats=out.info.stats,  # type: ignore[arg-type]
        live_traces=int(mask.sum()), shards=tuple(array.shards),  # type: ignore[arg-type]
    )  # fmt: skip
