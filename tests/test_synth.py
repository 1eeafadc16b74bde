"""The synthetic volume generator and the statistics it is stored with."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from seiscli.data.stats import StatsAccumulator, VolumeStats
from seiscli.data.synth import build_model, render_slab, ricker, synthetic_volume

SHAPE = (24, 40, 96)


def _neighbour_corr(v: np.ndarray, axis: int) -> float:
    a = np.moveaxis(v, axis, 0)
    return float(np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1])


def test_shape_dtype_and_determinism() -> None:
    a = synthetic_volume(SHAPE, seed=5)
    assert a.shape == SHAPE and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, synthetic_volume(SHAPE, seed=5))
    assert not np.allclose(a, synthetic_volume(SHAPE, seed=6))


def test_slabs_equal_whole_volume() -> None:
    model = build_model(SHAPE, seed=1)
    whole = synthetic_volume(SHAPE, seed=1)
    assert np.array_equal(render_slab(model, 7, 13), whole[7:13])


def test_structure_unlike_white_noise() -> None:
    v = synthetic_volume((32, 48, 128), seed=2)
    noise = np.random.default_rng(0).standard_normal(v.shape).astype(np.float32)
    for axis in (0, 1):  # neighbouring traces along inline and crossline look alike
        assert _neighbour_corr(v, axis) > 0.8
        assert abs(_neighbour_corr(noise, axis)) < 0.05
    assert _neighbour_corr(v, 2) > 0.5  # band-limited in time (Ricker), not white
    # the spectrum along time peaks at the wavelet's band (7-12 samples per period), not at DC or Nyquist
    spec = (np.abs(np.fft.rfft(v, axis=2)) ** 2).mean(axis=(0, 1))
    peak = np.fft.rfftfreq(v.shape[2])[np.argmax(spec)]
    assert 1 / 16 <= peak <= 1 / 5


def test_faults_offset_only_their_hanging_walls() -> None:
    model = build_model(SHAPE, seed=3)
    assert len(model.faults) >= 2
    unfaulted = dataclasses.replace(model, faults=())
    with_faults = render_slab(model, 0, SHAPE[0])
    without = render_slab(unfaulted, 0, SHAPE[0])
    t = np.arange(SHAPE[2])[None, None, :]
    i = np.arange(SHAPE[0])[:, None, None]
    j = np.arange(SHAPE[1])[None, :, None]
    hanging = np.zeros(SHAPE, dtype=bool)
    for f in model.faults:
        across = (i - f.centre[0]) * f.normal[0] + (j - f.centre[1]) * f.normal[1]
        hanging |= t < f.t0 + across * f.slope
    assert np.array_equal(with_faults[~hanging], without[~hanging])
    assert np.mean(np.abs(with_faults[hanging] - without[hanging]) > 0.1) > 0.3


def test_ricker_is_symmetric_with_unit_peak() -> None:
    w = ricker(0.1, 1.0)
    assert w[len(w) // 2] == pytest.approx(1.0)
    assert np.allclose(w, w[::-1])
    assert abs(w.sum()) < 0.05 * np.abs(w).sum()  # zero mean: no DC


def test_invalid_shape() -> None:
    with pytest.raises(ValueError, match="every axis must be >= 1"):
        build_model((0, 4, 4))


def test_stats_accumulator_matches_numpy() -> None:
    x = np.random.default_rng(1).laplace(0.3, 2.0, 200_000).astype(np.float32)
    acc = StatsAccumulator(float(x.min()), float(x.max()))
    for part in np.array_split(x, 7):
        acc.update(part)
    s = acc.result()
    assert s.count == x.size
    assert s.mean == pytest.approx(float(x.astype(np.float64).mean()), rel=1e-9)
    assert s.std == pytest.approx(float(x.astype(np.float64).std()), rel=1e-6)
    assert (s.min, s.max) == (float(x.min()), float(x.max()))
    assert sum(s.counts) == x.size
    width = (s.max - s.min) / len(s.counts)
    for q in (0.25, 0.5, 0.75):
        assert s.quantile(q) == pytest.approx(float(np.quantile(x, q)), abs=width)
    iqr = np.quantile(x, 0.75) - np.quantile(x, 0.25)
    assert s.robust_std == pytest.approx(iqr / 1.3489795, abs=2 * width)
    centre, scale = s.centre_scale()
    assert (centre, scale) == (s.median, s.robust_std)


def test_stats_v1_round_trip_and_mdio_schema() -> None:
    from mdio.builder.schemas.v1.stats import SummaryStatistics

    acc = StatsAccumulator(-1.0, 1.0, bins=16)
    acc.update(np.linspace(-1, 1, 101, dtype=np.float32))
    s = acc.result()
    encoded = SummaryStatistics.model_validate(s.to_stats_v1()).model_dump_json()
    assert VolumeStats.from_stats_v1(encoded) == s
    assert VolumeStats.from_stats_v1(json.loads(encoded)) == s


def test_stats_without_histogram_fall_back_to_mean_std() -> None:
    # what MDIO's own SEG-Y import stores: moments, empty histogram
    s = VolumeStats.from_stats_v1(
        {"count": 4, "sum": 4.0, "sumSquares": 20.0, "min": -1, "max": 3, "histogram": {"binCenters": [], "counts": []}}
    )
    assert not s.has_histogram
    assert s.centre_scale() == pytest.approx((1.0, 2.0))
    with pytest.raises(ValueError, match="no histogram"):
        s.quantile(0.5)
