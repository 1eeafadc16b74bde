"""Open an MDIO volume by URI and read 3D boxes from it.

A `Volume` carries only plain metadata across processes: the zarr group is opened lazily, per process
(the pid is checked on every access), and dropped when pickled, so DataLoader workers, forked or
spawned, never share a store, an fsspec filesystem or an event loop with their parent.
Reading uses zarr directly (not xarray/mdio), which keeps imports light and each box one zarr call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from seiscli.data.stats import VolumeStats
from seiscli.data.store import exists, storage_options_for

Shape3 = tuple[int, int, int]


class VolumeError(ValueError):
    """A volume that cannot be used: missing, not MDIO, not 3D; one line naming the URI."""


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

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


class Volume:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri
        self.storage_options = storage_options
        self._pid = -1
        self._group: Any = None
        self._array: Any = None
        self._mask: np.ndarray | None = None
        self.info = self._read_info()

    # -- lazy, per-process handles ---------------------------------------------------------------

    def _open(self) -> Any:
        if self._group is None or self._pid != os.getpid():
            import zarr

            try:
                self._group = zarr.open_group(self.uri, mode="r", storage_options=self.storage_options)
            except FileNotFoundError:
                raise VolumeError(f"{self.uri}: no MDIO/Zarr dataset there") from None
            self._pid = os.getpid()
            self._array = None
            self._mask = None
        return self._group

    def _data(self) -> Any:
        """The amplitude array, opened once per process (each open costs a metadata read, a GET on S3)."""
        group = self._open()
        if self._array is None:
            self._array = group[self.info.variable]
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_group": None, "_array": None, "_mask": None, "_pid": -1}

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
            chunks=tuple(int(c) for c in arr.chunks),  # type: ignore[arg-type]
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
        box = self._box(origin, shape)
        return np.asarray(self._data()[box])

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
) -> Volume:
    """The one way to open a volume (local path or object-store URI)."""
    if storage_options is None:
        storage_options = storage_options_for(uri, endpoint_url=endpoint_url, region=region)
    return Volume(uri, storage_options)
