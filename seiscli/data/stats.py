"""Per-volume amplitude statistics in MDIO's `statsV1` form, and the robust centre/scale derived from them.

MDIO v1 stores `{count, sum, sumSquares, min, max, histogram}` on the data variable as a JSON string
(`mdio/segy/blocked_io.py`). We fill the histogram (MDIO's SEG-Y import leaves it empty) so that the
loader can normalise by median and inter-quartile range, which heavy-tailed field data needs; with an
empty histogram it falls back to mean and standard deviation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HIST_BINS = 2048
IQR_TO_SIGMA = 1.0 / 1.3489795  # IQR of a unit normal


@dataclass(frozen=True)
class VolumeStats:
    count: int
    sum: float
    sum_squares: float
    min: float
    max: float
    bin_centers: tuple[float, ...] = ()
    counts: tuple[int, ...] = ()

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return float(np.sqrt(max(self.sum_squares / self.count - self.mean**2, 0.0)))

    @property
    def has_histogram(self) -> bool:
        return len(self.counts) > 0 and sum(self.counts) > 0

    def quantile(self, q: float) -> float:
        """Quantile from the histogram, linear within a bin (bins are contiguous around their centres)."""
        if not self.has_histogram:
            raise ValueError("these statistics have no histogram")
        c = np.asarray(self.bin_centers, dtype=np.float64)
        n = np.asarray(self.counts, dtype=np.float64)
        if len(c) == 1:
            return float(c[0])
        mids = (c[1:] + c[:-1]) / 2
        edges = np.concatenate([[c[0] - (mids[0] - c[0])], mids, [c[-1] + (c[-1] - mids[-1])]])
        cum = np.concatenate([[0.0], np.cumsum(n)])
        return float(np.interp(q * cum[-1], cum, edges))

    @property
    def median(self) -> float:
        return self.quantile(0.5)

    @property
    def robust_std(self) -> float:
        return (self.quantile(0.75) - self.quantile(0.25)) * IQR_TO_SIGMA

    def centre_scale(self) -> tuple[float, float]:
        """(median, IQR-sigma) when a histogram is stored, else (mean, std); the scale is never 0."""
        centre, scale = (self.median, self.robust_std) if self.has_histogram else (self.mean, self.std)
        if not np.isfinite(scale) or scale <= 0:
            scale = self.std if self.std > 0 else 1.0
        return float(centre), float(scale)

    def to_stats_v1(self) -> dict[str, Any]:
        return {
            "count": int(self.count),
            "sum": float(self.sum),
            "sumSquares": float(self.sum_squares),
            "min": float(self.min),
            "max": float(self.max),
            "histogram": {"binCenters": list(self.bin_centers), "counts": list(self.counts)},
        }

    @classmethod
    def from_stats_v1(cls, raw: str | dict[str, Any]) -> VolumeStats:
        d = json.loads(raw) if isinstance(raw, str) else raw
        h = d.get("histogram") or {}
        centres = h.get("binCenters")
        if centres is None and "binEdges" in h:  # EdgeDefinedHistogram: left edges + widths
            centres = [e + w / 2 for e, w in zip(h["binEdges"], h["binWidths"], strict=True)]
        return cls(
            count=int(d["count"]),
            sum=float(d["sum"]),
            sum_squares=float(d["sumSquares"]),
            min=float(d["min"]),
            max=float(d["max"]),
            bin_centers=tuple(float(x) for x in centres or ()),
            counts=tuple(int(x) for x in h.get("counts") or ()),
        )


@dataclass
class StatsAccumulator:
    """Exact moments and a fixed-range histogram, fed slab by slab (the range must be known up front)."""

    lo: float
    hi: float
    bins: int = HIST_BINS
    count: int = 0
    sum: float = 0.0
    sum_squares: float = 0.0
    min: float = np.inf
    max: float = -np.inf
    hist: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.hi <= self.lo:  # constant data: give the one value a bin of its own
            self.hi = self.lo + 1.0
        self.hist = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        v = values.ravel()
        if v.size == 0:
            return
        v64 = v.astype(np.float64)
        self.count += v.size
        self.sum += float(v64.sum())
        self.sum_squares += float(np.dot(v64, v64))
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        h, _ = np.histogram(v, bins=self.bins, range=(self.lo, self.hi))
        self.hist += h

    def result(self) -> VolumeStats:
        if self.count == 0:
            return VolumeStats(count=0, sum=0.0, sum_squares=0.0, min=0.0, max=0.0)
        width = (self.hi - self.lo) / self.bins
        centres = self.lo + width * (np.arange(self.bins) + 0.5)
        return VolumeStats(
            count=self.count,
            sum=self.sum,
            sum_squares=self.sum_squares,
            min=self.min,
            max=self.max,
            bin_centers=tuple(float(c) for c in centres),
            counts=tuple(int(c) for c in self.hist),
        )
