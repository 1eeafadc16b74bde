"""The trainer's crop loader: random 3D crops of MDIO volumes, normalised, as (B, 1, cz, cy, cx) tensors.

The stream is a pure function of (train.seed, dp_rank, position): sample `n` of a rank draws its volume,
origin and flips from its own generator seeded with (seed, dp_rank, n, attempt), so a run resumed at
`position` (samples consumed) continues with exactly the batches it would have seen, and ranks never
share a stream. Batches are built by DataLoader workers in order (`in_order=True`); a batch that was
prefetched but not handed to the trainer is not counted, so prefetching does not shift a resume.

Context parallelism: the ranks of a CP group share dp_rank, hence the sample; rank c of P reads only its
slab, the c-th contiguous 1/P of the crop along z after flips and transposes (= tokens [c*N/P, (c+1)*N/P)
in C-order over the (z, y, x) patch grid), so each rank fetches 1/P of the bytes.

data.align_crops: origins are drawn on the volume's chunk grid (uniformly over the aligned positions), so a
crop that is a multiple of the chunk shape reads exactly the chunks it covers; a random origin reads whole
chunks beyond the crop's edges (~2x the bytes at 3-4 chunks per axis). A crop that is not a multiple of some
volume's chunks is an error at build time rather than a silent half-measure. (With context parallelism a slab
that is not a multiple of the chunk depth still makes neighbouring ranks fetch the chunks they share.)

Throughput: workers are started by forkserver, so no event loop, connection pool or Rust runtime of the
trainer process crosses a fork; each worker reads the samples of a batch concurrently (one thread each,
all GETs of the process capped at data.concurrency by RetryingStore; decode in zarr's pool of DECODE_THREADS,
Blosc single-threaded) straight into a page-locked shared ring slot, as stored; the trainer process copies it
to the device and normalises it there (seiscli.train.batch_transfer). Counters reach the trainer with each
batch: `loader.stats()`.

Failed reads and dropped volumes (data_sync.py says why): a failed crop read (retries exhausted, or chunks lost
under live traces) is read again; after data.max_volume_failures failures of a volume in a row its samples are
marked lost (zeroed, never redrawn in the worker). The trainer process then drops the volume by agreement: with
its CP group at once (every rank of the group drops it, and the group reads that micro-batch again from the same
position without it), with every rank at the next step boundary. The stream is thus a function of (seed,
dp_rank, position, drop set), with the drop set shared by the CP group and, at step boundaries, by all ranks.
Each micro-batch the CP group also compares a digest of its samples and stops on a mismatch.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from seiscli.data.retry import IOStats, ReadError, RetryPolicy, process_stats
from seiscli.data.split import train_inlines
from seiscli.data.volume import DataLossError, Volume, open_volume
from seiscli.recipe import Recipe
from seiscli.train.batch_transfer import NORM_BLOCK as NORM_BLOCK  # re-exported
from seiscli.train.batch_transfer import DeviceFeed, Pump, SlotDataset, SlotRing, normalize_, ring_slots
from seiscli.train.data_sync import DataSync, digest

log = logging.getLogger(__name__)

Shape3 = tuple[int, int, int]
MAX_ATTEMPTS = 64  # crops tried per sample before a volume is declared too dead to train on
SYNTH_CHUNKS: Shape3 = (64, 64, 64)  # the local synthetic cache: small volumes, small crops
STATE_VERSION = 2
DECODE_THREADS = 2  # zarr decode threads per worker process


@dataclass(frozen=True)
class CropSpec:
    volume: int
    origin: Shape3
    flip_z: bool
    flip_y: bool
    transpose: bool  # swap inline and crossline (only when the crop is square in those axes)
    live_fraction: float


@dataclass
class BatchReport:
    """What one batch cost its worker; travels with the batch to the trainer process."""

    worker: int  # DataLoader worker id, -1 in the trainer process
    samples: int
    decoded_bytes: int
    busy_s: float
    cpu_s: float  # CPU time of the building process (all its threads) since its previous report
    io: IOStats
    failed_reads: int = 0
    lost: list[int] = field(default_factory=list)  # volumes of samples that could not be read (slabs zeroed)
    digest: int = 0  # of the batch's samples: (position, volume, origin, flips, transpose) each
    volumes: list[int] = field(default_factory=list)  # volume of each sample, for normalising on the device


def slab_box(spec: CropSpec, crop: Shape3, cp_rank: int, cp_size: int) -> tuple[Shape3, Shape3]:
    """(origin, shape) of the volume box that holds slab cp_rank of the crop after its flips and transpose."""
    cz, cy, _ = crop
    s = cz // cp_size
    lo, hi = cp_rank * s, (cp_rank + 1) * s
    origin, shape = list(spec.origin), list(crop)
    axis, flipped, n = (1, spec.flip_y, cy) if spec.transpose else (0, spec.flip_z, cz)
    if flipped:
        lo, hi = n - hi, n - lo
    origin[axis] += lo
    shape[axis] = hi - lo
    return tuple(origin), tuple(shape)  # type: ignore[return-value]


def volume_view(out: np.ndarray, spec: CropSpec) -> np.ndarray:
    """The view of `out` (a sample or its slab) in the volume's axis order: writing the volume box into it
    leaves `out` flipped and transposed as the spec says, with no copy."""
    v = out.transpose(1, 0, 2) if spec.transpose else out
    if spec.flip_y:
        v = v[:, ::-1]
    if spec.flip_z:
        v = v[::-1]
    return v


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_CPU_MARK: dict[int, float] = {}


def _cpu_since_last_report() -> float:
    now, pid = time.process_time(), os.getpid()
    last = _CPU_MARK.get(pid, now)
    _CPU_MARK[pid] = now
    return now - last


def _pool(size: int) -> ThreadPoolExecutor:
    """Threads that read the samples of a batch at once, one set per process (never inherited)."""
    key = (os.getpid(), size)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="seis-crop")
    return _POOLS[key]


class CropDataset(Dataset[tuple[torch.Tensor, BatchReport]]):
    """Item `p` is the micro-batch of samples p .. p+micro_batch-1 of this rank's stream, and its report."""

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
        cp_rank: int = 0,
        cp_size: int = 1,
        max_volume_failures: int = 3,
        align_crops: bool = False,
        holdout_fraction: float = 0.0,
    ) -> None:
        if not 0 <= cp_rank < cp_size:
            raise ValueError(f"cp_rank {cp_rank} is outside 0..{cp_size - 1}")
        if crop[0] % cp_size:
            raise ValueError(f"crop z={crop[0]} does not split into cp_size={cp_size} slabs")
        self.volumes = volumes
        self.crop = crop
        self.micro_batch = micro_batch
        self.seed = seed % 2**63  # SeedSequence wants non-negative entropy
        self.dp_rank = dp_rank
        self.cp_rank, self.cp_size = cp_rank, cp_size
        self.flips = flips
        self.min_live_fraction = min_live_fraction
        self.normalization = normalization
        self.clip = clip
        self.max_volume_failures = max_volume_failures
        self.steps = [_origin_steps(v, crop, align_crops) for v in volumes]
        # Where crops may lie: the held-out inlines at the end of each volume are cut off here, so no origin
        # drawn below can put a crop voxel there (seiscli/data/split.py).
        self.extents = [_train_extent(v, crop, holdout_fraction) for v in volumes]
        self.weights = np.array([_weight(v) for v in volumes], dtype=np.float64)
        self.centre_scale = [_centre_scale(v, normalization) for v in volumes]
        self.dropped: set[int] = set()
        self._init_failure_state()

    def _init_failure_state(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[int, int] = {}
        self._failed_reads = 0
        self._lost: set[int] = set()  # volumes this process gave up on; the trainer process drops them
        self._cum = self._cum_weights()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_failures", "_failed_reads", "_lost", "_cum"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_failure_state()

    @property
    def slab(self) -> Shape3:
        cz, cy, cx = self.crop
        return (cz // self.cp_size, cy, cx)

    def _cum_weights(self) -> np.ndarray | None:
        """Cumulative draw probabilities of the volumes not dropped; None when none is left."""
        w = self.weights.copy()
        w[list(self.dropped)] = 0.0
        return np.cumsum(w / w.sum()) if w.sum() > 0 else None

    def set_dropped(self, dropped: set[int]) -> None:
        """The drop set every rank of the group agreed on; samples are drawn from the other volumes."""
        with self._lock:
            self.dropped = set(dropped)
            self._cum = self._cum_weights()

    def sample_digest(self, spec: CropSpec, index: int) -> int:
        """What the ranks of a CP group must agree on for sample `index` (their volume lists were compared when
        the loaders were built, so the volume's index names it)."""
        return digest(index, spec.volume, spec.origin, spec.flip_z, spec.flip_y, spec.transpose)

    def spec(self, index: int) -> CropSpec:
        """Where sample `index` of this rank comes from; crops below min_live_fraction are redrawn."""
        best: CropSpec | None = None
        cum = self._cum
        if cum is None:
            raise RuntimeError(
                f"all {len(self.volumes)} volumes were dropped after repeated read failures; see the warnings above"
            )
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, self.dp_rank, index, attempt])
            v = int(min(np.searchsorted(cum, rng.random(), side="right"), len(self.volumes) - 1))
            vol = self.volumes[v]
            # step 1 (the default) draws any origin; a chunk step draws uniformly over the aligned ones
            origin = tuple(
                int(rng.integers(0, (n - c) // k + 1)) * k
                for n, c, k in zip(self.extents[v], self.crop, self.steps[v], strict=True)
            )
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

    def read_into(self, spec: CropSpec, out: np.ndarray, normalize: bool = True) -> None:
        """Read this rank's slab of one crop into `out` (cz/P, cy, cx), flipped, and normalised unless told not
        to (then `out` has the stored dtype and `sample_norm` says how to normalise it later)."""
        origin, _ = slab_box(spec, self.crop, self.cp_rank, self.cp_size)
        self.volumes[spec.volume].read_into(origin, volume_view(out, spec))
        if normalize:
            normalize_(out, self.sample_norm(spec.volume), self.clip)

    def sample_norm(self, volume: int) -> tuple[float, float] | None:
        """(centre, scale) of a sample of `volume`, None when only non-finite values are zeroed."""
        return self.centre_scale[volume] if self.normalization == "zscore" else None

    @property
    def stored_dtype(self) -> np.dtype:
        """The dtype all volumes store (crops ship in it and are normalised on the device)."""
        dtypes = {v.dtype for v in self.volumes}
        if len(dtypes) != 1:
            raise ValueError(f"data.uris mix stored dtypes {sorted(map(str, dtypes))}; convert them to one dtype")
        return dtypes.pop()

    def load(self, index: int, out: np.ndarray, normalize: bool = True) -> tuple[CropSpec, bool]:
        """Sample `index` into `out` (normalised, or as stored with normalize=False); returns its spec and
        whether it was read. A failed read is repeated; once its volume has failed max_volume_failures times in
        a row (in this process) the sample is lost: `out` is zeroed and the caller must not train on it. Never
        redrawn here: only the trainer process, with its CP group, may change the stream (data_sync.py)."""
        spec = self.spec(index)
        v = spec.volume
        while v not in self._lost:
            try:
                self.read_into(spec, out, normalize)
            except (ReadError, DataLossError) as e:
                with self._lock:
                    self._failed_reads += 1
                    n = self._failures[v] = self._failures.get(v, 0) + 1
                    if n >= self.max_volume_failures:
                        self._lost.add(v)
                log.debug("sample %d: read of %s failed (%d in a row): %s", index, spec, n, e)
                if n >= self.max_volume_failures:
                    log.warning("giving up on %s after %d failed reads in a row: %s", self.volumes[v].uri, n, e)
                continue
            with self._lock:
                self._failures.pop(v, None)
            return spec, True
        out[...] = 0
        return spec, False

    def __getitem__(self, position: int) -> tuple[torch.Tensor, BatchReport]:
        """The normalised float32 batch at `position` built in this process (shared memory in a worker)."""
        batch = torch.empty((self.micro_batch, 1, *self.slab), dtype=torch.float32)
        if get_worker_info() is not None:  # build the batch in shared memory: no copy on the way back
            batch.share_memory_()
        return batch, self.fill(position, batch.numpy(), normalize=True)

    def fill(self, position: int, view: np.ndarray, normalize: bool = False) -> BatchReport:
        """Samples position .. position+micro_batch-1 into `view` (micro_batch, 1, *slab): normalised float32,
        or (normalize=False) as stored, for the device to normalise (`BatchReport.volumes`)."""
        t0 = time.perf_counter()
        if os.getpid() not in _CPU_MARK:
            _cpu_since_last_report()  # start counting with the first batch, not at process start
        info = get_worker_info()
        if self.micro_batch == 1:
            loaded = [self.load(position, view[0, 0], normalize)]
        else:
            pool = _pool(self.micro_batch)
            jobs = [pool.submit(self.load, position + i, view[i, 0], normalize) for i in range(self.micro_batch)]
            loaded = [job.result() for job in jobs]
        with self._lock:
            failed, self._failed_reads = self._failed_reads, 0
        report = BatchReport(
            worker=info.id if info is not None else -1,
            samples=self.micro_batch,
            decoded_bytes=self.micro_batch * int(np.prod(self.slab)) * 4,  # as float32 crops, whatever ships
            busy_s=time.perf_counter() - t0,
            cpu_s=_cpu_since_last_report(),
            io=process_stats().take(),
            failed_reads=failed,
            lost=sorted({spec.volume for spec, ok in loaded if not ok}),
            digest=digest(*(self.sample_digest(spec, position + i) for i, (spec, _) in enumerate(loaded))),
            volumes=[spec.volume for spec, _ in loaded],
        )
        return report


class _Positions(Sampler[int]):
    """start, start + step, ... forever."""

    def __init__(self, start: int, step: int) -> None:
        self.start, self.step = start, step

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start, self.step)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    cap_codec_threads(DECODE_THREADS)


def cap_codec_threads(threads: int) -> None:
    """One process's decode threads: zarr decodes chunks in its thread pool (the codecs release the GIL), and
    Blosc would start threads of its own inside each of them; 8 workers per GPU must not oversubscribe."""
    import numcodecs.blosc
    import zarr

    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": threads})


def _origin_steps(v: Volume, crop: Shape3, align: bool) -> Shape3:
    """Spacing of the crop origins drawn in `v`: 1 per axis, or its chunk shape under data.align_crops."""
    if not align:
        return (1, 1, 1)
    if any(c % k for c, k in zip(crop, v.chunks, strict=True)):
        raise ValueError(
            f"data.align_crops: crop {tuple(crop)} is not a multiple of the chunk shape {v.chunks} of {v.uri} on "
            f"every axis, so aligned crops would still read chunks beyond their edges; choose a crop that is a "
            f"multiple of the chunks or set data.align_crops=false"
        )
    return v.chunks


def _train_extent(v: Volume, crop: Shape3, holdout_fraction: float) -> Shape3:
    """The volume's shape with the held-out inlines removed; an error when no crop fits in what is left."""
    n = train_inlines(v.shape[0], holdout_fraction)
    if n < crop[0]:
        raise ValueError(
            f"data.holdout_fraction={holdout_fraction} leaves {n} training inlines of {v.uri} {v.shape}, fewer "
            f"than data.crop z={crop[0]}; allowed: a smaller fraction or crop"
        )
    return (n, v.shape[1], v.shape[2])


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


def _worker_context() -> Any:
    """forkserver: workers fork from a clean server process, not from the trainer, whose event loops,
    connection pools, obstore's tokio runtime (not fork-safe) and NCCL/gloo threads must not be copied."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # imports torch/zarr once in the server, not in every worker
    return ctx


@dataclass
class _WorkerTotals:
    batches: int = 0
    samples: int = 0
    decoded_bytes: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0
    io: IOStats = field(default_factory=IOStats)


class CropLoader:
    """Iterable of normalised crop batches on `device`; `state_dict()` is the position in samples.

    Workers decode crops as stored into a ring of shared slots (seiscli.train.batch_transfer); the trainer
    process copies each slot to `device` (CUDA: on a side stream, one batch ahead) and normalises it there.
    `start()` launches the workers and asks for the first batches before anything iterates (call it while
    the model is built); the first iterator at that position takes them over.

    One iterator is live at a time: starting another, `load_state_dict` to another position or `close()`
    stops the workers of the previous one (which then raises or ends).
    """

    def __init__(
        self,
        dataset: CropDataset,
        *,
        workers: int,
        prefetch: int,
        device: torch.device,
        sync: DataSync | None = None,
        lookahead: bool | None = None,
    ) -> None:
        self.dataset = dataset
        self.workers = workers
        self.prefetch = prefetch
        self.device = device
        self.sync = sync  # None: a single process, or ranks that need not agree (tests)
        # a thread that copies the next batch while the current step runs; by default on CUDA with workers
        self.lookahead = device.type == "cuda" and workers > 0 if lookahead is None else lookahead
        self.position = 0  # samples handed out
        self._generation = 0
        self._workers_iter: Any = None
        self._pump: Pump | None = None
        self._pump_position = -1  # where the started pump begins; -1 when none was started
        self._ring: SlotRing | None = None
        self._totals: dict[int, _WorkerTotals] = {}
        self._failed_reads = 0
        self._lost_samples = 0
        self._agreed = -1  # size of the drop set all ranks shared at the last step boundary (-1: not yet)
        self._restart = False  # the drop set changed: batches prefetched with the old one are discarded
        self._started = time.perf_counter()
        _LIVE_LOADERS.add(self)

    @property
    def micro_batch(self) -> int:
        return self.dataset.micro_batch

    def _ring_for(self) -> SlotRing:
        if self._ring is None:
            shape = (self.micro_batch, 1, *self.dataset.slab)
            self._ring = SlotRing(ring_slots(self.workers, self.prefetch), shape, self.dataset.stored_dtype)
            # the ring lives as long as the loader (restarts reuse it); released when the loader is collected
            weakref.finalize(self, self._ring.close).atexit = False
        return self._ring

    def _source(self, start: int, ring: SlotRing) -> Iterator[tuple[int, BatchReport]]:
        mb = self.micro_batch
        slots = SlotDataset(self.dataset, ring, mb)
        if self.workers == 0:
            self._workers_iter = None
            return (slots[p] for p in itertools.count(start, mb))
        loader = DataLoader(
            slots,
            batch_size=None,
            sampler=_Positions(start, mb),
            num_workers=self.workers,
            prefetch_factor=self.prefetch,
            pin_memory=False,  # the ring is page-locked itself: no copy into pinned memory
            worker_init_fn=_worker_init,
            multiprocessing_context=_worker_context(),
            in_order=True,
        )
        self._workers_iter = iter(loader)  # workers start and the first prefetch*workers batches are asked for
        return self._workers_iter

    def _norm_rows(self, report: BatchReport) -> list[tuple[float, float]] | None:
        if self.dataset.normalization != "zscore":
            return None
        return [self.dataset.centre_scale[v] for v in report.volumes]

    def start(self) -> None:
        """Start the workers and request the first batches from the current position (idempotent)."""
        if self._pump is not None and self._pump_position == self.position:
            return
        self.close()
        ring = self._ring_for()
        source = self._source(self.position, ring)
        feed = DeviceFeed(self.device, self.dataset.clip)
        self._pump = Pump(source, ring, feed, self._norm_rows, threaded=self.lookahead, pin=self.device.type == "cuda")
        self._pump_position = self.position

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._generation += 1
        generation = self._generation
        self.end_step()  # a resumed or restarted stream starts from the drop set every rank agrees on
        if self._restart:  # the drop set changed: an early-started pump prefetched with the old one
            self._restart = False
            self.close()
        pump = self._take_pump()  # takes over a pump started at this position, else starts one
        try:
            while True:
                if generation != self._generation or self._pump is not pump:
                    raise RuntimeError("this CropLoader iterator is stale: the loader was restarted or re-iterated")
                if self._restart:  # agreed at a step boundary: what the workers prefetched is stale
                    self._restart = False
                    pump = self._restart_pump()
                try:
                    batch, report = pump.next()
                except StopIteration:
                    return
                if generation != self._generation:
                    raise RuntimeError("this CropLoader iterator is stale: the loader was restarted or re-iterated")
                self._absorb(report)
                lost = self._agree_batch(report)
                if lost:  # the CP group drops them together and reads this position again without them
                    self._drop(lost, "on this rank or a context-parallel peer")
                    pump = self._restart_pump()
                    continue
                self.position += self.micro_batch
                yield batch
        finally:
            if self._pump is pump:
                self.close()

    def _take_pump(self) -> Pump:
        self.start()
        self._pump_position = -1  # taken: a second iterator restarts
        assert self._pump is not None
        return self._pump

    def _restart_pump(self) -> Pump:
        """Stop the workers and the copy thread, and start them again at the current position."""
        self.close()
        return self._take_pump()

    def _agree_batch(self, report: BatchReport) -> set[int]:
        """Volumes that this rank or a peer of its CP group could not read in this micro-batch (raises if the
        group's samples differ)."""
        self._lost_samples += len(report.lost)
        if self.sync is None:
            return set(report.lost)
        return self.sync.check_batch(self.position, report.digest, report.lost, self.micro_batch)

    def _drop(self, volumes: set[int], why: str) -> None:
        ds = self.dataset
        for v in sorted(volumes - ds.dropped):
            log.warning("data: volume %s dropped after repeated read failures (%s)", ds.volumes[v].uri, why)
        ds.set_dropped(ds.dropped | volumes)
        if ds._cum is None:
            raise RuntimeError(
                f"all {len(ds.volumes)} volumes were dropped after repeated read failures; see the warnings above"
            )

    def end_step(self) -> None:
        """A step boundary, called by every rank after the step's last micro-batch: all ranks adopt the union of
        their drop sets (one scalar all-reduce when nothing changed), so checkpoints agree and a volume found
        dead by one group is not read again by the others."""
        if self.sync is None:
            return
        ds = self.dataset
        agreed = self.sync.union(ds.dropped, len(ds.volumes), self._agreed)
        if agreed != ds.dropped:
            self._drop(agreed - ds.dropped, "by another rank, at a step boundary")
            self._restart = True
        self._agreed = len(agreed)

    def _absorb(self, report: BatchReport) -> None:
        t = self._totals.setdefault(report.worker, _WorkerTotals())
        t.batches += 1
        t.samples += report.samples
        t.decoded_bytes += report.decoded_bytes
        t.busy_s += report.busy_s
        t.cpu_s += report.cpu_s
        t.io.add(report.io)
        self._failed_reads += report.failed_reads

    def stats(self) -> dict[str, float]:
        """Counters since this loader was built, summed over its workers (cumulative; log them as they are).

        samples, batches, decoded_bytes (delivered crops), bytes_read (fetched from the store, as stored),
        requests, retries, throttled (503 SlowDown among the retries), read_errors (GETs failed for good),
        missing_chunks, failed_reads (crop reads that failed and were repeated), samples_lost (samples given up
        on, then read again from another volume with the CP group), volumes_dropped,
        volumes_active, worker_busy_s (summed time workers spent building batches), worker_cpu_s (their CPU
        time, all threads), request_s (summed GET latency), elapsed_s (since the loader was built)."""
        io = IOStats()
        totals = _WorkerTotals()
        for t in self._totals.values():
            io.add(t.io)
            totals.batches += t.batches
            totals.samples += t.samples
            totals.decoded_bytes += t.decoded_bytes
            totals.busy_s += t.busy_s
            totals.cpu_s += t.cpu_s
        return {
            "samples": totals.samples,
            "batches": totals.batches,
            "decoded_bytes": totals.decoded_bytes,
            "bytes_read": io.bytes,
            "requests": io.requests,
            "retries": io.retries,
            "throttled": io.throttled,
            "read_errors": io.errors,
            "missing_chunks": io.missing,
            "failed_reads": self._failed_reads,
            "samples_lost": self._lost_samples,
            "volumes_dropped": len(self.dataset.dropped),
            "volumes_active": len(self.dataset.volumes) - len(self.dataset.dropped),
            "worker_busy_s": totals.busy_s,
            "worker_cpu_s": totals.cpu_s,
            "request_s": io.request_s,
            "elapsed_s": time.perf_counter() - self._started,
        }

    def worker_stats(self) -> dict[int, dict[str, float]]:
        """Per worker (-1: the trainer process itself when data.workers=0): batches, samples, decoded_bytes,
        bytes_read, requests, retries, busy_s, cpu_s."""
        return {
            w: {
                "batches": t.batches,
                "samples": t.samples,
                "decoded_bytes": t.decoded_bytes,
                "bytes_read": t.io.bytes,
                "requests": t.io.requests,
                "retries": t.io.retries,
                "busy_s": t.busy_s,
                "cpu_s": t.cpu_s,
            }
            for w, t in sorted(self._totals.items())
        }

    def close(self) -> None:
        """Stop the worker processes and the copy thread of the live iterator, if any (idempotent)."""
        it, self._workers_iter = self._workers_iter, None
        pump, self._pump = self._pump, None
        self._pump_position = -1
        if pump is not None:
            pump.stop()
        if it is not None:
            it._shutdown_workers()  # the DataLoader iterator's own shutdown, which its __del__ would run
        if pump is not None:
            pump.close()

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "seed": self.dataset.seed,
            "dp_rank": self.dataset.dp_rank,
            "dropped": sorted(self.dataset.volumes[v].uri for v in self.dataset.dropped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; an iterator started before this call stops with an error."""
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {state.get('version')!r}; this loader reads 1 and {STATE_VERSION}")
        for key in ("seed", "dp_rank"):
            if state[key] != getattr(self.dataset, key):
                raise ValueError(
                    f"loader state was saved with {key}={state[key]}, this loader has {getattr(self.dataset, key)}"
                )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"loader state position {position} < 0")
        uris = [v.uri for v in self.dataset.volumes]
        dropped = {uris.index(u) for u in state.get("dropped", []) if u in uris}
        self._agreed = -1  # saved by this rank: agreed again with the others before the first batch
        if (
            self._pump is not None
            and self._pump_position == position == self.position
            and (dropped == self.dataset.dropped)
        ):
            return  # started early (start()) at exactly this state: keep the batches already asked for
        self.close()  # its workers prefetch positions that no longer come next
        self.dataset.set_dropped(dropped)
        self.position = position
        self._generation += 1


def _volumes(recipe: Recipe, sync: DataSync | None = None) -> list[Volume]:
    data = recipe.data
    policy = RetryPolicy(attempts=data.retries, concurrency=data.concurrency)
    if data.source == "synthetic":
        from seiscli.data.cache import ensure_synthetic

        chunks: Shape3 = tuple(min(c, s) for c, s in zip(SYNTH_CHUNKS, data.synth_shape, strict=True))  # type: ignore[assignment]
        path = ensure_synthetic(tuple(data.synth_shape), recipe.train.seed, chunks)  # type: ignore[arg-type]
        return [open_volume(str(path), policy=policy)]
    from seiscli.data.store import expand, storage_options_for

    options = storage_options_for(data.uris[0], endpoint_url=data.endpoint_url, region=data.region)
    # Globbed once (rank 0) when distributed: a volume appearing under the prefix during start-up must not
    # give the ranks different lists.
    glob_uris = functools.partial(expand, list(data.uris), options)
    uris = glob_uris() if sync is None else sync.decide(glob_uris)
    volumes, too_small, empty = [], [], []
    for uri in uris:
        vol = open_volume(
            uri,
            storage_options=storage_options_for(uri, endpoint_url=data.endpoint_url, region=data.region),
            client=data.s3_client,
            policy=policy,
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


def _check_same_volumes(sync: DataSync, volumes: list[Volume], *, synthetic: bool) -> None:
    """Every rank opened the same volumes with the same shapes and weights (the synthetic cache's path may
    differ between nodes, so it is not part of its identity)."""
    names = ", ".join(v.uri for v in volumes[:3]) + (", ..." if len(volumes) > 3 else "")
    sync.check_same(
        digest(*(("" if synthetic else v.uri, v.shape, _weight(v)) for v in volumes)),
        f"the volumes to train on ({names}): a volume changed while the ranks opened it",
    )


def check_cp(recipe: Recipe, cp_size: int) -> None:
    """Slabs are whole planes of patches: the crop's patch grid along z must split into cp_size parts."""
    gz = recipe.grid[0]
    if cp_size < 1 or gz % cp_size:
        raise ValueError(
            f"data.crop z={recipe.data.crop[0]} is {gz} patches of model.patch_size={recipe.model.patch_size}, "
            f"which does not split into cp_size={cp_size} slabs: the z patch count must be divisible by parallelism.cp"
        )


def build_loader(
    recipe: Recipe,
    *,
    dp_rank: int,
    dp_size: int,
    device: torch.device,
    cp_rank: int = 0,
    cp_size: int = 1,
    sync: DataSync | None = None,
) -> CropLoader:
    """The loader of one rank: dp_rank picks the stream; cp_rank of cp_size picks the slab of each sample
    (batches are (micro_batch, 1, crop_z / cp_size, crop_y, crop_x)). Collective when torch.distributed is
    initialised (every rank calls it): the ranks then agree on volumes and drops through `sync` (data_sync.py),
    made here unless given."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
    check_cp(recipe, cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside 0..{cp_size - 1}")
    data = recipe.data
    if sync is None and dist.is_available() and dist.is_initialized():
        sync = DataSync.create(cp_size)
    volumes = _volumes(recipe, sync)
    if sync is not None:
        _check_same_volumes(sync, volumes, synthetic=data.source == "synthetic")
    dataset = CropDataset(
        volumes,
        crop=tuple(data.crop),  # type: ignore[arg-type]
        micro_batch=recipe.train.micro_batch,
        seed=recipe.train.seed,
        dp_rank=dp_rank,
        flips=data.flips,
        min_live_fraction=data.min_live_fraction,
        normalization=data.normalization,
        clip=data.clip,
        cp_rank=cp_rank,
        cp_size=cp_size,
        max_volume_failures=data.max_volume_failures,
        align_crops=data.align_crops,
        holdout_fraction=data.holdout_fraction,
    )
    return CropLoader(
        dataset, workers=data.workers, prefetch=data.prefetch, device=device, sync=sync, lookahead=data.lookahead
    )
