"""The last leg of a crop batch: a ring of shared host slots that workers fill in place, normalisation on
the device, and host-to-device copies on a side stream.

Why (issue 13, loader CPU per delivered GB): before this, every batch was a fresh shared-memory tensor
(1.68 GB of new pages to fault in per pretrain crop), copied once more by the pin-memory thread, then
copied to the GPU on the compute stream, and the normalisation ran on the worker's CPU. Now
- workers decode straight into one of `slots` pre-allocated buffers of the stored dtype (no per-batch
  allocation, no pin-memory copy: the ring itself is page-locked with cudaHostRegister);
- the trainer process copies a slot to the GPU on a side stream while the previous step runs, and normalises
  it there (on the compute stream), in float32 with the same operations as `normalize_` (so the same bits).
Shipping bf16/fp16 instead would halve the ring and the copy but add a host pass (a float32 decode buffer
plus a cast): benchmarks/bench_loader_cpu.py --casts; the stored dtype costs the host nothing.

Slot reuse: DataLoader (in order) hands index j to a worker when batch j - workers * prefetch is returned
to the trainer, so with `workers * prefetch + 2` slots the slot of batch i - 2 is rewritten only after
batch i has been received; the pump waits for batch i - 2's copy before asking for batch i.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)
SLOT_MARGIN = 2  # slots beyond the loader's outstanding batches (see the module docstring)
NORM_BLOCK = 1 << 16  # float32s normalised at a time: 256 KiB, stays in L2


def ring_slots(workers: int, prefetch: int) -> int:
    return max(workers, 1) * prefetch + SLOT_MARGIN if workers else SLOT_MARGIN


class SlotRing:
    """`slots` host buffers of `shape` and `dtype` in one shared mapping, mapped lazily in each process.

    The mapping is an anonymous memfd of the creating process; other processes (DataLoader workers,
    started by forkserver) open it through /proc/<creator>/fd, so nothing is left in /dev/shm when a job
    is killed. Without memfd (not Linux) it is an unlinked-on-close file in the temp directory."""

    def __init__(self, slots: int, shape: Sequence[int], dtype: np.dtype | str) -> None:
        self.slots = slots
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.slot_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.nbytes = self.slot_bytes * slots
        self._owner = os.getpid()
        self._path: str | None = None
        if hasattr(os, "memfd_create"):
            self._fd = os.memfd_create("seis-crop-ring")
        else:  # pragma: no cover - not Linux
            self._fd, self._path = tempfile.mkstemp(prefix="seis-crop-ring-")
        os.ftruncate(self._fd, self.nbytes)
        self._pid = -1
        self._map: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._pinned: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": -1, "_map": None, "_array": None, "_pinned": None}

    def array(self) -> np.ndarray:
        """(slots, *shape) view of the ring in this process."""
        if self._array is None or self._pid != os.getpid():
            if os.getpid() == self._owner:
                fd, close = self._fd, False
            else:
                fd, close = os.open(self._path or f"/proc/{self._owner}/fd/{self._fd}", os.O_RDWR), True
            try:
                self._map = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                if close:
                    os.close(fd)
            self._array = np.frombuffer(self._map, dtype=self.dtype).reshape(self.slots, *self.shape)
            self._pid = os.getpid()
        return self._array

    def tensor(self, slot: int) -> torch.Tensor:
        return torch.from_numpy(self.array()[slot])

    def pin(self) -> bool:
        """Page-lock the ring for DMA copies (touches every page once: do it while other work goes on)."""
        if self._pinned is not None or not torch.cuda.is_available():
            return self._pinned is not None
        t = torch.from_numpy(self.array().reshape(-1).view(np.uint8))
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), self.nbytes, 0)
        if int(rc) != 0:  # not fatal: copies from pageable memory are slower (and block their thread), not wrong
            log.warning("crop ring of %.1f GB not page-locked (cudaHostRegister: %s)", self.nbytes / 1e9, rc)
            return False
        log.info("crop ring: %d slots of %.2f GB, page-locked", self.slots, self.slot_bytes / 1e9)
        self._pinned = t
        return True

    def close(self) -> None:
        """Release the pinning and the creator's descriptor (mappings live on until they are dropped)."""
        if os.getpid() != self._owner:
            return
        if self._pinned is not None:
            torch.cuda.cudart().cudaHostUnregister(self._pinned.data_ptr())
            self._pinned = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._path:
                os.unlink(self._path)


class Fillable(Protocol):
    def fill(self, position: int, out: np.ndarray) -> Any: ...


class SlotDataset(torch.utils.data.Dataset[tuple[int, Any]]):
    """Item `position`: `base.fill(position, slot)` into the ring slot of that batch; returns (slot, report)."""

    def __init__(self, base: Fillable, ring: SlotRing, micro_batch: int) -> None:
        self.base, self.ring, self.micro_batch = base, ring, micro_batch

    def slot(self, position: int) -> int:
        return (position // self.micro_batch) % self.ring.slots

    def __getitem__(self, position: int) -> tuple[int, Any]:
        slot = self.slot(position)
        return slot, self.base.fill(position, self.ring.array()[slot])


def normalize_(out: np.ndarray, centre_scale: tuple[float, float] | None, clip: float) -> None:
    """In place: (x - centre) / scale clipped to +-clip (when centre_scale is given), NaN/inf (dead traces are
    NaN in MDIO) to 0. Done block by block so the four passes run in cache, not four trips through memory:
    on a 36 MiB crop 24 ms instead of 55 (dev box, ad hoc), the same bits."""
    flat = out.reshape(-1) if out.flags.c_contiguous else None
    blocks = (flat[i : i + NORM_BLOCK] for i in range(0, flat.size, NORM_BLOCK)) if flat is not None else [out]
    for b in blocks:
        if centre_scale is not None:
            b -= np.float32(centre_scale[0])
            b *= np.float32(1.0 / centre_scale[1])
            np.clip(b, -clip, clip, out=b)
        np.nan_to_num(b, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def normalize_batch(x: torch.Tensor, centre: torch.Tensor | None, inv_scale: torch.Tensor | None, clip: float) -> None:
    """In place, on float32 `x` (B, ...): per sample (x - centre) * inv_scale clipped to +-clip (when centre is
    given), then NaN/inf to 0. The operations and their order are normalize_'s, so the bits are the same."""
    if centre is not None and inv_scale is not None:
        shape = (-1,) + (1,) * (x.dim() - 1)
        x.sub_(centre.view(shape)).mul_(inv_scale.view(shape)).clamp_(-clip, clip)
    torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)


def centre_inv_scale(rows: Sequence[tuple[float, float]] | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample float32 centre and 1/scale, rounded as normalize_ rounds them (np.float32(1.0 / scale))."""
    if rows is None:
        return None, None
    centre = torch.tensor(np.array([np.float32(c) for c, _ in rows], dtype=np.float32))
    inv = torch.tensor(np.array([np.float32(1.0 / s) for _, s in rows], dtype=np.float32))
    return centre, inv


class DeviceFeed:
    """Copies a host batch to `device` and normalises it there. On CUDA the copy runs on a side stream (one
    batch ahead, from the pump's thread) and `ready` normalises on the caller's stream after waiting for it:
    on the compute stream the four elementwise passes cost ~4 ms of a 1.7 s pretrain step and never share the
    SMs with the step's kernels (measured no different from the side stream on an H200, BENCHMARKS.md).
    Elsewhere both run inline on a fresh array."""

    def __init__(self, device: torch.device, clip: float) -> None:
        self.device, self.clip = device, clip
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def send(self, host: torch.Tensor, rows: Sequence[tuple[float, float]] | None) -> tuple[Any, Any]:
        """(what `ready` takes, the copy's event or None)."""
        if not self.cuda:  # numpy's blocked pass: on a busy host torch's thread pool made it 50x slower
            x = host.numpy().astype(np.float32, copy=True)  # an array of its own: the slot is refilled later
            for i in range(x.shape[0]):
                normalize_(x[i], None if rows is None else rows[i], self.clip)
            return torch.from_numpy(x), None
        assert self.stream is not None
        centre, inv = centre_inv_scale(rows)
        with torch.cuda.stream(self.stream):
            x = host.to(self.device, non_blocking=True)
            if centre is not None and inv is not None:
                centre, inv = centre.to(self.device, non_blocking=True), inv.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return (x, centre, inv), done

    def ready(self, sent: Any, done: torch.cuda.Event | None) -> torch.Tensor:
        """The normalised float32 batch, ordered on the current stream (call from the thread that uses it)."""
        if done is None:
            return sent
        x, centre, inv = sent
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for t in (x, centre, inv):  # allocated on the side stream: not reused before the compute stream is done
            if t is not None:
                t.record_stream(current)
        x = x.to(torch.float32)
        normalize_batch(x, centre, inv, self.clip)
        return x


class _Stop:
    pass


class Pump:
    """Pulls (slot, report) from `source`, sends each slot through `feed`, and hands out
    (device batch, copy-done event, report). With `threaded`, a thread runs one batch ahead so the next
    batch's copy overlaps the current step; otherwise each batch is built when asked for."""

    def __init__(
        self,
        source: Iterator[tuple[int, Any]],
        ring: SlotRing,
        feed: DeviceFeed,
        rows: Callable[[Any], Sequence[tuple[float, float]] | None],
        *,
        threaded: bool,
        pin: bool,
    ) -> None:
        self.source, self.ring, self.feed, self.rows = source, ring, feed, rows
        self._events: dict[int, torch.cuda.Event] = {}
        self._i = 0
        self._pin = pin
        self._closed = threading.Event()
        self._queue: queue.Queue[Any] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._run, name="seis-h2d", daemon=True)
            self._thread.start()
        elif pin:
            ring.pin()

    def _produce(self) -> tuple[Any, torch.cuda.Event | None, Any]:
        old = self._events.pop(self._i - SLOT_MARGIN, None)
        if old is not None:
            old.synchronize()  # receiving batch i lets a worker rewrite the slot of batch i - 2
        slot, report = next(self.source)
        x, done = self.feed.send(self.ring.tensor(slot), self.rows(report))
        if done is not None:
            self._events[self._i] = done
        self._i += 1
        return x, done, report

    def _run(self) -> None:
        assert self._queue is not None
        try:
            if self._pin:
                self.ring.pin()
            while not self._closed.is_set():
                item = self._produce()
                while not self._closed.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, raised there
            self._put_final(e)
        else:
            self._put_final(_Stop())

    def _put_final(self, item: Any) -> None:
        assert self._queue is not None
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[torch.Tensor, Any]:
        """The next (batch on the device, ready for the current stream, report)."""
        if self._closed.is_set():
            raise RuntimeError("this batch pump was closed")
        if self._queue is None:
            x, done, report = self._produce()
        else:
            item = self._queue.get()
            if isinstance(item, _Stop):
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            x, done, report = item
        return self.feed.ready(x, done), report

    def stop(self) -> None:
        """Tell the thread to stop handing out batches (before the source is shut down)."""
        self._closed.set()

    def close(self) -> None:
        """Stop the thread (it may be blocked in the source: shut the source down first)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for ev in self._events.values():
            ev.synchronize()
        self._events.clear()
