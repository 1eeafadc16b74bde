"""Open an MDIO volume by URI and read 3D boxes from it.

A `Volume` carries only plain metadata across processes: the zarr group is opened lazily, per process
(the pid is checked on every access), and dropped when pickled, so DataLoader workers, forked or
spawned, never share a store, an fsspec filesystem, an obstore client or an event loop with their parent.
Reading uses zarr directly (not xarray/mdio), which keeps imports light and each box one zarr call; every
GET goes through `RetryingStore` (retries, in-flight cap, counters).

A chunk missing from the store reads as fill value in Zarr, which MDIO uses for dead traces. A missing chunk
under live traces (by the trace mask) is data loss, not dead data: `read_into` raises `DataLossError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from seiscli.data.retry import RetryingStore, RetryPolicy
from seiscli.data.stats import VolumeStats
from seiscli.data.store import S3Client, exists, open_store, storage_options_for

Shape3 = tuple[int, int, int]


class VolumeError(ValueError):
    """A volume that cannot be used: missing, not MDIO, not 3D; one line naming the URI."""


class DataLossError(OSError):
    """Chunks under live traces are missing from the store (deleted or never written)."""


@dataclass(frozen=True)
class VolumeInfo:
    uri: str
    variable: str
    shape: Shape3
    chunks: Shape3
    dtype: str
    stats: VolumeStats | None
    has_mask: bool
    attributes: dict[str, Any]
    shards: Shape3 | None = None  # Zarr v3 sharding: objects of this shape, read in units of `chunks` inside

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class Volume:
    def __init__(
        self,
        uri: str,
        storage_options: dict[str, Any] | None = None,
        *,
        client: S3Client = "obstore",
        policy: RetryPolicy | None = None,
    ) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self.client = client
        self.policy = policy or RetryPolicy()
        self._pid = -1
        self._store: RetryingStore | None = None
        self._group: Any = None
        self._array: Any = None
        self._mask: np.ndarray | None = None
        self._reader: Any = None  # seiscli.data.shards.ShardReader for sharded arrays, per process
        self.info = self._read_info()

    # -- lazy, per-process handles ---------------------------------------------------------------

    def _open(self) -> Any:
        if self._group is None or self._pid != os.getpid():
            import zarr

            if zarr.config.get("async.concurrency") < self.policy.concurrency:
                # RetryingStore's per-process cap is the one that binds, not zarr's per-call default of 10
                zarr.config.set({"async.concurrency": self.policy.concurrency})
            store = open_store(self.uri, self.storage_options, client=self.client, policy=self.policy)
            try:
                self._group = zarr.open_group(store=store, mode="r")
            except FileNotFoundError:
                raise VolumeError(f"{self.uri}: no MDIO/Zarr dataset there") from None
            self._store = store  # type: ignore[assignment]
            self._pid = os.getpid()
            self._array = None
            self._mask = None
            self._reader = None
        return self._group

    def _data(self) -> Any:
        """The amplitude array, opened once per process (each open costs a metadata read, a GET on S3)."""
        group = self._open()
        if self._array is None:
            from seiscli.data.shards import ShardReader

            self._array = group[self.info.variable]
            self._reader = ShardReader.for_array(self._array, self._store)
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        drop = {"_store": None, "_group": None, "_array": None, "_mask": None, "_reader": None, "_pid": -1}
        return {**self.__dict__, **drop}

    def _read_info(self) -> VolumeInfo:
        if not exists(self.uri, self.storage_options):
            raise VolumeError(f"{self.uri}: does not exist")
        group = self._open()
        ds_attrs = dict(group.attrs)
        variable = (ds_attrs.get("attributes") or {}).get("defaultVariableName", "amplitude")
        if variable not in group:
            raise VolumeError(f"{self.uri}: no variable {variable!r}; is this an MDIO v1 dataset?")
        arr = group[variable]
        if arr.ndim != 3:
            raise VolumeError(f"{self.uri}: variable {variable!r} has {arr.ndim} axes; need 3")
        raw_stats = arr.attrs.get("statsV1")
        stats = VolumeStats.from_stats_v1(raw_stats) if raw_stats else None
        return VolumeInfo(
            uri=self.uri,
            variable=variable,
            shape=tuple(int(s) for s in arr.shape),  # type: ignore[arg-type]
            chunks=tuple(int(c) for c in arr.chunks),  # type: ignore[arg-type]  (inner chunks when sharded)
            shards=tuple(int(s) for s in arr.shards) if arr.shards else None,  # type: ignore[arg-type]
            dtype=str(arr.dtype),
            stats=stats,
            has_mask="trace_mask" in group,
            attributes=ds_attrs,
        )

    # -- plain metadata --------------------------------------------------------------------------

    @property
    def shape(self) -> Shape3:
        return self.info.shape

    @property
    def chunks(self) -> Shape3:
        return self.info.chunks

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.info.dtype)

    def shard_order(self) -> str | None:
        """How inner chunks lie in the shards: "c" (seis data rechunk), "morton" (zarr's writes), None unsharded."""
        self._data()
        return self._reader.write_order() if self._reader is not None else None

    @property
    def stats(self) -> VolumeStats | None:
        return self.info.stats

    # -- reads -----------------------------------------------------------------------------------

    def _box(self, origin: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
        if len(origin) != len(shape) or any(s < 1 for s in shape):
            raise ValueError(f"box origin {tuple(origin)} / shape {tuple(shape)}: need matching axes, sizes >= 1")
        for o, s, n in zip(origin, shape, self.shape[: len(origin)], strict=True):
            if o < 0 or o + s > n:
                raise ValueError(f"box origin {tuple(origin)} shape {tuple(shape)} exceeds {self.uri} {self.shape}")
        return tuple(slice(o, o + s) for o, s in zip(origin, shape, strict=True))

    def read(self, origin: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
        """The box [origin, origin + shape) as a numpy array (dead traces hold the fill value NaN)."""
        out = np.empty(shape, dtype=self.dtype)
        self.read_into(origin, out)
        return out

    def read_into(self, origin: tuple[int, int, int], out: np.ndarray) -> None:
        """Read the box at `origin` of out.shape straight into `out`, which may be any strided view (a flipped
        or transposed window of a batch): each chunk is decoded once and copied once, into its place."""
        from zarr.core.buffer import default_buffer_prototype

        box = self._box(origin, out.shape)
        if out.dtype != self.dtype:
            raise ValueError(f"read_into: out has dtype {out.dtype}, {self.uri} stores {self.dtype}")
        array = self._data()
        if self._reader is not None:  # sharded: coalesced range GETs, all in flight at once
            from zarr.core.sync import sync

            sync(self._reader.read_into(tuple(s.start for s in box), out))
        else:
            array.get_basic_selection(box, out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
        self._check_missing()

    def _check_missing(self) -> None:
        """Missing amplitude chunks are fine under dead traces only."""
        assert self._store is not None
        if not self._store.missing_keys:
            return
        keys, self._store.missing_keys = self._store.missing_keys, set()
        prefix = f"{self.info.variable}/c/"
        mask = self.live_mask()
        cz, cy = (self.info.shards or self.chunks)[:2]  # keys name shards when the array is sharded
        for key in sorted(keys):
            if not key.startswith(prefix):
                continue
            i, j = (int(p) for p in key[len(prefix) :].split("/")[:2])
            if mask[i * cz : (i + 1) * cz, j * cy : (j + 1) * cy].any():
                raise DataLossError(f"{self.uri}: chunk {key} is missing from the store but covers live traces")

    def has_variable(self, name: str) -> bool:
        return name in self._open()

    def read_variable(self, name: str, origin: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
        """The box of another variable of the dataset, e.g. voxel labels stored beside the amplitudes."""
        group = self._open()
        if name not in group:
            raise VolumeError(f"{self.uri}: no variable {name!r} (synthetic volumes written by seis carry fault_mask)")
        return np.asarray(group[name][self._box(origin, shape)])

    def live_mask(self) -> np.ndarray:
        """The (inline, crossline) live-trace mask, loaded once per process; all True without one."""
        group = self._open()
        if self._mask is None:
            if self.info.has_mask:
                self._mask = np.asarray(group["trace_mask"][...], dtype=bool)
            else:
                self._mask = np.ones(self.shape[:2], dtype=bool)
        return self._mask

    def live_fraction(self, origin: tuple[int, int], shape: tuple[int, int]) -> float:
        box = self._box(origin, shape)
        return float(self.live_mask()[box].mean())


def open_volume(
    uri: str,
    *,
    storage_options: dict[str, Any] | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
    client: S3Client = "obstore",
    policy: RetryPolicy | None = None,
) -> Volume:
    """The one way to open a volume (local path or object-store URI)."""
    if storage_options is None:
        storage_options = storage_options_for(uri, endpoint_url=endpoint_url, region=region)
    return Volume(uri, storage_options, client=client, policy=policy)
