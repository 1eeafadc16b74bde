"""Synthetic post-stack seismic: layered reflectivity, folds, normal faults, Ricker wavelet, mild noise.

Axes are (inline, crossline, time) = (z, y, x) in the crop convention. Each trace samples one 1D
"geological time" trace at tau(i, j, t) = t * stretch(i, j) + shift(i, j) minus the throw of every
fault whose hanging wall holds the sample. The 1D trace is convolved with the wavelet before it is
warped, which equals convolving each output trace while the warp is a per-trace shift (and differs
only by the gentle stretch otherwise); it makes the volume one gather per sample instead of one
convolution per trace, so 512^3 takes seconds. The 1D trace is oversampled so nearest lookup is
accurate to 1/8 sample.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Shape3 = tuple[int, int, int]

OVERSAMPLE = 8  # fine samples per output sample of the 1D trace
SLAB_VOXELS = 1 << 22  # voxels generated per slab: temporaries stay in cache-friendly tens of MB
NOISE_LEVEL = 0.05  # noise rms relative to the signal rms
FAULT_HALF_WIDTH = 1.5  # traces either side of a fault plane that the label marks (a 3-trace fault zone)
MIN_LABELLED_THROW = 1.0  # samples: where the tapered throw is smaller, the fault is invisible and unlabelled


@dataclass(frozen=True)
class Fault:
    normal: tuple[float, float]  # horizontal unit normal (inline, crossline), pointing into the hanging wall
    centre: tuple[float, float]
    t0: float  # time where the plane passes through the centre trace
    slope: float  # samples of time per trace of horizontal distance (steepness)
    throw: float  # maximum vertical offset, samples
    half_length: float  # along-strike Gaussian taper of the throw, traces


@dataclass(frozen=True)
class SynthModel:
    """Everything random about one volume, drawn once from (shape, seed); slabs are then pure functions."""

    shape: Shape3
    seed: int
    shift: np.ndarray  # (nz, ny) float32: dip plane and folds
    stretch: np.ndarray  # (nz, ny) float32: folding that grows with depth
    amplitude: np.ndarray  # (nz, ny) float32: smooth lateral amplitude variation
    faults: tuple[Fault, ...]
    trace: np.ndarray  # oversampled convolved 1D trace, float32
    tau0: float  # tau of trace[0]
    noise_rms: float


def ricker(peak_freq: float, dt: float) -> np.ndarray:
    """Ricker wavelet with peak frequency `peak_freq` cycles per unit, sampled every `dt`, peak at the centre."""
    half = int(np.ceil(1.5 / peak_freq / dt))
    t = np.arange(-half, half + 1) * dt
    a = (np.pi * peak_freq * t) ** 2
    return ((1.0 - 2.0 * a) * np.exp(-a)).astype(np.float32)


def _waves(rng: np.random.Generator, nz: int, ny: int, terms: int, max_slope: float) -> np.ndarray:
    """Sum of long-wavelength 2D sinusoids (48-256 traces) whose gradients add up to at most `max_slope`
    per trace: gentle folds whatever the survey size."""
    i = np.arange(nz, dtype=np.float64)[:, None]
    j = np.arange(ny, dtype=np.float64)[None, :]
    out = np.zeros((nz, ny))
    for _ in range(terms):
        wavelength = rng.uniform(48.0, 256.0)
        angle = rng.uniform(0, 2 * np.pi)
        slope = max_slope / terms * rng.uniform(0.5, 1.0)
        phase = 2 * np.pi * (i * np.cos(angle) + j * np.sin(angle)) / wavelength + rng.uniform(0, 2 * np.pi)
        out += slope * wavelength / (2 * np.pi) * np.sin(phase)
    return out


def _reflectivity(rng: np.random.Generator, n_fine: int, mean_thickness: float) -> np.ndarray:
    """Blocky log-impedance with random layer thicknesses; reflectivity = half its derivative at boundaries."""
    r = np.zeros(n_fine, dtype=np.float64)
    pos = 0.0
    log_imp = 0.0
    while True:
        pos += rng.gamma(2.0, mean_thickness / 2.0) * OVERSAMPLE
        if pos >= n_fine:
            break
        step = rng.normal(0.0, 0.08) + (0.25 if rng.random() < 0.05 else 0.0) * rng.choice([-1, 1])
        log_imp += step
        r[int(pos)] += 0.5 * step
    # weak fine-scale texture between the main boundaries
    r += rng.normal(0.0, 0.004, n_fine) * (rng.random(n_fine) < 1.0 / OVERSAMPLE)
    return r


def build_model(shape: Shape3, seed: int = 0) -> SynthModel:
    """Draw the structure of a volume. Cheap (2D fields and one 1D trace)."""
    nz, ny, nx = (int(s) for s in shape)
    if min(nz, ny, nx) < 1:
        raise ValueError(f"synthetic shape {shape}: every axis must be >= 1")
    rng = np.random.default_rng([int(seed), 0x5E15])
    ii = np.arange(nz, dtype=np.float64)[:, None]
    jj = np.arange(ny, dtype=np.float64)[None, :]

    # gentle dips: plane + folds + a dome, each bounded in samples per trace so neighbours stay alike
    dip_i, dip_j = rng.uniform(-0.15, 0.15, 2)
    shift = dip_i * ii + dip_j * jj + _waves(rng, nz, ny, 3, 0.35)
    ci, cj = rng.uniform(0.2, 0.8) * nz, rng.uniform(0.2, 0.8) * ny
    width = max(20.0, rng.uniform(0.2, 0.4) * max(nz, ny))
    dome = rng.uniform(0.1, 0.25) * rng.choice([-1.0, 1.0]) * width / 0.607  # max gradient = 0.607 A / width
    shift += dome * np.exp(-((ii - ci) ** 2 + (jj - cj) ** 2) / (2 * width**2))
    stretch = 1.0 + _waves(rng, nz, ny, 2, 0.25) / nx  # folding that grows to 0.25 sample/trace at the bottom
    amplitude = 1.0 + _waves(rng, nz, ny, 2, 0.01)  # +-~20 % lateral amplitude variation

    faults = []
    for _ in range(int(rng.integers(2, 5))):
        angle = rng.uniform(0, np.pi)
        faults.append(
            Fault(
                normal=(float(np.cos(angle)), float(np.sin(angle))),
                centre=(float(rng.uniform(0.15, 0.85) * nz), float(rng.uniform(0.15, 0.85) * ny)),
                t0=float(rng.uniform(0.3, 0.7) * nx),
                slope=float(rng.uniform(1.5, 4.0)),
                throw=float(rng.uniform(0.02, 0.06) * nx + 2.0),
                half_length=float(rng.uniform(0.4, 1.0) * max(nz, ny)),
            )
        )

    # the tau range every sample can reach, with a wavelet's margin on both sides
    total_throw = sum(f.throw for f in faults)
    lo = float(shift.min()) + min(0.0, float(stretch.min()) * (nx - 1)) - total_throw
    hi = float(shift.max()) + float(stretch.max()) * (nx - 1)
    peak = rng.uniform(1 / 12, 1 / 7)  # cycles per sample: 7-12 samples per dominant period
    wavelet = ricker(peak, 1.0 / OVERSAMPLE)
    margin = len(wavelet) // OVERSAMPLE + 2
    tau0 = np.floor(lo) - margin
    n_fine = int((np.ceil(hi) + margin - tau0) * OVERSAMPLE) + 1
    refl = _reflectivity(rng, n_fine, mean_thickness=float(rng.uniform(4.0, 9.0)))
    trace = np.convolve(refl, wavelet, mode="same").astype(np.float32)
    rms = float(np.sqrt(np.mean(trace.astype(np.float64) ** 2))) or 1.0
    trace /= rms  # unit rms before lateral amplitude and noise

    f32 = np.float32
    return SynthModel(
        shape=(nz, ny, nx),
        seed=int(seed),
        shift=shift.astype(f32),
        stretch=stretch.astype(f32),
        amplitude=amplitude.astype(f32),
        faults=tuple(faults),
        trace=trace,
        tau0=float(tau0),
        noise_rms=NOISE_LEVEL,
    )


def render_slab(model: SynthModel, z0: int, z1: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inlines [z0, z1) of the volume; equal to the same rows of a whole-volume render."""
    _, ny, nx = model.shape
    if out is None:
        out = np.empty((z1 - z0, ny, nx), dtype=np.float32)
    t = np.arange(nx, dtype=np.float32)[None, None, :]
    zs = slice(z0, z1)
    tau = t * model.stretch[zs, :, None]
    tau += model.shift[zs, :, None] - np.float32(model.tau0)
    hanging = np.empty(tau.shape, dtype=bool)
    ii = np.arange(z0, z1, dtype=np.float32)[:, None]
    jj = np.arange(ny, dtype=np.float32)[None, :]
    for f in model.faults:
        across = (ii - f.centre[0]) * f.normal[0] + (jj - f.centre[1]) * f.normal[1]
        along = -(ii - f.centre[0]) * f.normal[1] + (jj - f.centre[1]) * f.normal[0]
        throw = (f.throw * np.exp(-0.5 * (along / f.half_length) ** 2)).astype(np.float32)
        # hanging wall = above the plane (t < cut); it moved down, so it shows older (smaller) tau
        cut = (f.t0 + across * f.slope).astype(np.float32)
        np.less(t, cut[:, :, None], out=hanging)
        np.subtract(tau, throw[:, :, None], out=tau, where=hanging)
    tau *= OVERSAMPLE
    tau += 0.5
    np.take(model.trace, tau.astype(np.int32), out=out, mode="clip")
    out *= model.amplitude[zs, :, None]
    for k in range(z0, z1):  # noise seeded per inline: independent of how the volume is sliced
        rng = np.random.default_rng([model.seed, 0x0015E, k])
        out[k - z0] += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(model.noise_rms)
    return out


def fault_slab(model: SynthModel, z0: int, z1: int) -> np.ndarray:
    """Fault labels of inlines [z0, z1) as uint8 (1: within FAULT_HALF_WIDTH traces of a fault plane whose
    throw there is at least MIN_LABELLED_THROW samples); equal to the same rows of `fault_labels`."""
    _, ny, nx = model.shape
    t = np.arange(nx, dtype=np.float32)[None, None, :]
    ii = np.arange(z0, z1, dtype=np.float32)[:, None]
    jj = np.arange(ny, dtype=np.float32)[None, :]
    out = np.zeros((z1 - z0, ny, nx), dtype=bool)
    for f in model.faults:
        across = (ii - f.centre[0]) * f.normal[0] + (jj - f.centre[1]) * f.normal[1]
        along = -(ii - f.centre[0]) * f.normal[1] + (jj - f.centre[1]) * f.normal[0]
        throw = f.throw * np.exp(-0.5 * (along / f.half_length) ** 2)
        # the plane t = t0 + across * slope, as the horizontal position it reaches at each time sample
        distance = np.abs(across[:, :, None] - (t - f.t0) / f.slope)
        out |= (distance <= FAULT_HALF_WIDTH) & (throw >= MIN_LABELLED_THROW)[:, :, None]
    return out.astype(np.uint8)


def fault_labels(shape: Shape3, seed: int = 0) -> np.ndarray:
    """The fault-zone mask of `synthetic_volume(shape, seed)`, uint8 (inline, crossline, time)."""

    def fill(model: Any, z0: int, z1: int, out: np.ndarray) -> None:
        out[...] = fault_slab(model, z0, z1)

    return _by_slabs(build_model(shape, seed), np.uint8, fill)


def slab_rows(shape: Shape3) -> int:
    return max(1, SLAB_VOXELS // max(1, shape[1] * shape[2]))


def synthetic_volume(shape: Shape3, seed: int = 0) -> np.ndarray:
    """The whole volume as float32 (inline, crossline, time)."""

    def fill(model: Any, z0: int, z1: int, out: np.ndarray) -> None:
        render_slab(model, z0, z1, out=out)

    return _by_slabs(build_model(shape, seed), np.float32, fill)


def _by_slabs(model: Any, dtype: Any, fill: Callable[[Any, int, int, np.ndarray], None]) -> np.ndarray:
    """The whole volume of `model`, filled slab by slab along inlines (bounded working memory)."""
    out = np.empty(model.shape, dtype=dtype)
    step = slab_rows(model.shape)
    for z0 in range(0, model.shape[0], step):
        z1 = min(model.shape[0], z0 + step)
        fill(model, z0, z1, out[z0:z1])
    return out
