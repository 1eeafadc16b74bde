"""The trainer's crop loader: random 3D crops of MDIO volumes, normalised, as (B, 1, cz, cy, cx) tensors.

The stream is a pure function of (train.seed, dp_rank, position): sample `n` of a rank draws its volume,
origin and flips from its own generator seeded with (seed, dp_rank, n, attempt), so a run resumed at
`position` (samples consumed) continues with exactly the batches it would have seen, and ranks never
share a stream. Batches are built by DataLoader workers in order (`in_order=True`); a batch that was
prefetched but not handed to the trainer is not counted, so prefetching does not shift a resume.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from seiscli.data.volume import Volume, open_volume
from seiscli.recipe import Recipe

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]
MAX_ATTEMPTS = 64  # crops tried per sample before a volume is declared too dead to train on
SYNTH_CHUNKS: Shape3 = (64, 64, 64)  # the local synthetic cache: small volumes, small crops
STATE_VERSION = 1


@dataclass(frozen=True)
class CropSpec:
    volume: int
    origin: Shape3
    flip_z: bool
    flip_y: bool
    transpose: bool  # swap inline and crossline (only when the crop is square in those axes)
    live_fraction: float


class CropDataset(Dataset[torch.Tensor]):
    """Item `p` is the micro-batch of samples p .. p+micro_batch-1 of this rank's stream."""

    def __init__(
        self,
        volumes: list[Volume],
        *,
        crop: Shape3,
        micro_batch: int,
        seed: int,
        dp_rank: int,
        flips: bool,
        min_live_fraction: float,
        normalization: str,
        clip: float,
    ) -> None:
        self.volumes = volumes
        self.crop = crop
        self.micro_batch = micro_batch
        self.seed = seed % 2**63  # SeedSequence wants non-negative entropy
        self.dp_rank = dp_rank
        self.flips = flips
        self.min_live_fraction = min_live_fraction
        self.normalization = normalization
        self.clip = clip
        weights = np.array([_weight(v) for v in volumes], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        self.centre_scale = [_centre_scale(v, normalization) for v in volumes]

    def spec(self, index: int) -> CropSpec:
        """Where sample `index` of this rank comes from; crops below min_live_fraction are redrawn."""
        best: CropSpec | None = None
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, self.dp_rank, index, attempt])
            v = int(min(np.searchsorted(self.cum_weights, rng.random(), side="right"), len(self.volumes) - 1))
            vol = self.volumes[v]
            origin = tuple(int(rng.integers(0, n - c + 1)) for n, c in zip(vol.shape, self.crop, strict=True))
            fz, fy, tr = (bool(b) for b in rng.integers(0, 2, 3)) if self.flips else (False, False, False)
            tr = tr and self.crop[0] == self.crop[1]
            live = vol.live_fraction(origin[:2], self.crop[:2]) if vol.info.has_mask else 1.0
            spec = CropSpec(v, origin, fz, fy, tr, live)  # type: ignore[arg-type]
            if live >= self.min_live_fraction:
                return spec
            if best is None or live > best.live_fraction:
                best = spec
        raise RuntimeError(
            f"sample {index}: no crop {self.crop} with >= {self.min_live_fraction:.0%} live traces in "
            f"{MAX_ATTEMPTS} tries (best {best.live_fraction if best else 0:.0%}); lower data.min_live_fraction "
            f"or check the volumes' trace_mask"
        )

    def read_into(self, spec: CropSpec, out: np.ndarray) -> None:
        """Read, flip and normalise one crop into `out` (cz, cy, cx) float32."""
        raw = self.volumes[spec.volume].read(spec.origin, self.crop)
        if spec.flip_z:
            raw = raw[::-1]
        if spec.flip_y:
            raw = raw[:, ::-1]
        if spec.transpose:
            raw = raw.transpose(1, 0, 2)
        if self.normalization == "zscore":
            centre, scale = self.centre_scale[spec.volume]
            np.subtract(raw, np.float32(centre), out=out, dtype=np.float32)
            out *= np.float32(1.0 / scale)
            np.clip(out, -self.clip, self.clip, out=out)
        else:
            out[...] = raw
        np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)  # dead traces are NaN in MDIO

    def __getitem__(self, position: int) -> torch.Tensor:
        batch = torch.empty((self.micro_batch, 1, *self.crop), dtype=torch.float32)
        if get_worker_info() is not None:  # build the batch in shared memory: no copy on the way back
            batch.share_memory_()
        view = batch.numpy()
        for i in range(self.micro_batch):
            self.read_into(self.spec(position + i), view[i, 0])
        return batch


class _Positions(Sampler[int]):
    """start, start + step, ... forever."""

    def __init__(self, start: int, step: int) -> None:
        self.start, self.step = start, step

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start, self.step)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _weight(v: Volume) -> float:
    """Volumes are drawn in proportion to their live samples (stats count), else their size."""
    if v.stats is not None and v.stats.count > 0:
        return float(v.stats.count)
    return float(np.prod(v.shape))


def _centre_scale(v: Volume, normalization: str) -> tuple[float, float]:
    if normalization != "zscore":
        return 0.0, 1.0
    if v.stats is None or v.stats.count == 0:
        raise ValueError(
            f"{v.uri}: no statsV1 statistics on {v.info.variable!r}; data.normalization='zscore' needs them "
            f"(or set data.normalization=none)"
        )
    return v.stats.centre_scale()


_LIVE_LOADERS: weakref.WeakSet[CropLoader] = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    # Stop worker processes and the pin-memory thread before the interpreter tears torch down; left to
    # garbage collection at exit, the pin-memory thread dies with a traceback.
    for loader in list(_LIVE_LOADERS):
        loader.close()


class CropLoader:
    """Iterable of normalised crop batches on `device`; `state_dict()` is the position in samples.

    One iterator is live at a time: starting another, `load_state_dict` or `close()` stops the workers
    of the previous one (which then raises or ends).
    """

    def __init__(
        self,
        dataset: CropDataset,
        *,
        workers: int,
        prefetch: int,
        device: torch.device,
    ) -> None:
        self.dataset = dataset
        self.workers = workers
        self.prefetch = prefetch
        self.device = device
        self.position = 0  # samples handed out
        self._generation = 0
        self._workers_iter: Any = None
        _LIVE_LOADERS.add(self)

    @property
    def micro_batch(self) -> int:
        return self.dataset.micro_batch

    def _batches(self, start: int) -> Iterator[torch.Tensor]:
        mb = self.micro_batch
        if self.workers == 0:
            return (self.dataset[p] for p in itertools.count(start, mb))
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_Positions(start, mb),
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init,
            in_order=True,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.close()
        self._generation += 1
        generation = self._generation
        batches = self._batches(self.position)
        if self.workers:
            self._workers_iter = batches
        try:
            for batch in batches:
                if generation != self._generation:
                    raise RuntimeError("this CropLoader iterator is stale: the loader was restarted or re-iterated")
                if self.device.type == "cuda" and not batch.is_pinned():
                    batch = batch.pin_memory()
                self.position += self.micro_batch
                yield batch.to(self.device, non_blocking=True)
        finally:
            if self._workers_iter is batches:
                self.close()

    def close(self) -> None:
        """Stop the worker processes of the live iterator, if any (idempotent)."""
        it, self._workers_iter = self._workers_iter, None
        if it is not None:
            it._shutdown_workers()  # the DataLoader iterator's own shutdown, which its __del__ would run

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "seed": self.dataset.seed,
            "dp_rank": self.dataset.dp_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; an iterator started before this call stops with an error."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}; this loader reads {STATE_VERSION}")
        for key in ("seed", "dp_rank"):
            if state[key] != getattr(self.dataset, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {getattr(self.dataset, key)}"
                )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"loader state position {position} < 0")
        self.close()  # its workers prefetch positions that no longer come next
        self.position = position
        self._generation += 1


def _volumes(recipe: Recipe) -> list[Volume]:
    data = recipe.data
    if data.source == "synthetic":
        from seiscli.data.cache import ensure_synthetic

        chunks: Shape3 = tuple(min(c, s) for c, s in zip(SYNTH_CHUNKS, data.synth_shape, strict=True))  # type: ignore[assignment]
        path = ensure_synthetic(tuple(data.synth_shape), recipe.train.seed, chunks)  # type: ignore[arg-type]
        return [open_volume(str(path))]
    from seiscli.data.store import expand, storage_options_for

    options = storage_options_for(data.uris[0], endpoint_url=data.endpoint_url, region=data.region)
    uris = expand(list(data.uris), options)
    volumes, too_small, empty = [], [], []
    for uri in uris:
        vol = open_volume(
            uri, storage_options=storage_options_for(uri, endpoint_url=data.endpoint_url, region=data.region)
        )
        if vol.stats is not None and vol.stats.count == 0:
            empty.append(vol)
        elif all(n >= c for n, c in zip(vol.shape, data.crop, strict=True)):
            volumes.append(vol)
        else:
            too_small.append(vol)
    for vol in too_small:
        log.warning("skipping %s: shape %s is smaller than data.crop %s", vol.uri, vol.shape, tuple(data.crop))
    for vol in empty:
        log.warning("skipping %s: its statistics count no live samples", vol.uri)
    if not volumes:
        raise ValueError(
            f"no usable volume in data.uris for data.crop {tuple(data.crop)}: "
            + "; ".join(
                [f"{v.uri} {v.shape} is smaller" for v in too_small] + [f"{v.uri} has no live samples" for v in empty]
            )
        )
    return volumes


def build_loader(recipe: Recipe, *, dp_rank: int, dp_size: int, device: torch.device) -> CropLoader:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
    data = recipe.data
    dataset = CropDataset(
        _volumes(recipe),
        crop=tuple(data.crop),  # type: ignore[arg-type]
        micro_batch=recipe.train.micro_batch,
        seed=recipe.train.seed,
        dp_rank=dp_rank,
        flips=data.flips,
        min_live_fraction=data.min_live_fraction,
        normalization=data.normalization,
        clip=data.clip,
    )
    return CropLoader(dataset, workers=data.workers, prefetch=data.prefetch, device=device)
