"""Retries with backoff, a cap on requests in flight, and I/O counters, around any zarr store.

The object-store clients below (obstore, s3fs/botocore) are built with their own retries off, so every
retry happens here, where it is counted: a throttled or failing store shows up in the trainer's metrics
instead of as an unexplained slow step. Missing keys are not errors in Zarr (an unwritten chunk is all
fill value), so they are recorded for the reader to judge against the trace mask.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, fields
from typing import Any, Literal

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0


@dataclass
class IOStats:
    """Counters of one process; `DataLoader` workers send theirs to the trainer with each batch."""

    requests: int = 0  # GETs that returned (data or a missing key)
    bytes: int = 0  # bytes received (encoded, as stored)
    retries: int = 0  # GETs repeated after a transient error
    throttled: int = 0  # of those, throttling answers (503 SlowDown)
    errors: int = 0  # GETs that failed for good (retries exhausted or not retryable)
    missing: int = 0  # keys that were not there
    request_s: float = 0.0  # summed latency of successful GETs

    def add(self, other: IOStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def take(self) -> IOStats:
        """A copy of the counters, which are reset to zero."""
        with _LOCK:
            out = IOStats(**{f.name: getattr(self, f.name) for f in fields(self)})
            for f in fields(self):
                setattr(self, f.name, type(getattr(self, f.name))())
        return out

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# One counter set and one in-flight cap per process: every volume's store feeds the same numbers. The
# counters are bumped on zarr's event-loop thread and read from the reading threads, hence the lock.
_PROCESS: dict[str, Any] = {"pid": -1}
_LOCK = threading.Lock()


def process_stats() -> IOStats:
    _reset_if_forked()
    return _PROCESS["stats"]


def _reset_if_forked() -> None:
    if _PROCESS["pid"] != os.getpid():
        _PROCESS.update(pid=os.getpid(), stats=IOStats(), limits={})


def _limiter(limit: int) -> asyncio.Semaphore:
    """The process-wide cap on GETs in flight, one semaphore per (event loop, limit)."""
    _reset_if_forked()
    key = (id(asyncio.get_running_loop()), limit)
    sem = _PROCESS["limits"].get(key)
    if sem is None:
        sem = _PROCESS["limits"][key] = asyncio.Semaphore(limit)
    return sem


# -- classifying a failed GET by what the clients type, not by their wording -----------------------------------
# botocore (s3fs, aiobotocore) carries the HTTP status and the S3 error code in ClientError.response; s3fs raises
# FileNotFoundError/PermissionError/OSError with that ClientError as the cause; aiohttp's ClientResponseError has
# .status; botocore and aiohttp type their timeouts and connection failures. obstore (0.12) types 401/403/404 and
# invalid paths as exception classes, and everything else (5xx, 429, timeouts, dropped connections) as
# GenericError without a status attribute: there the status is read from the fixed "status code: NNN" field of
# object_store's RetryError, and a GenericError without one is a transport failure.

Kind = Literal["throttle", "transient", "permanent"]
THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
     "TooManyRequestsException", "RequestThrottled", "RequestThrottledException", "SlowDownRead"}
)  # fmt: skip
_OBSTORE_STATUS = re.compile(r"status code: (\d{3})\b")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those it was raised from or during (s3fs wraps botocore's), at most 8."""
    out: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(out) < 8 and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _obstore_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(permanent classes, GenericError) from obstore, or empty tuples without it."""
    try:
        from obstore import exceptions as ox
    except ImportError:
        return (), ()
    permanent = tuple(
        getattr(ox, n)
        for n in ("PermissionDeniedError", "UnauthenticatedError", "InvalidPathError", "NotFoundError",
                  "NotSupportedError", "PreconditionError", "AlreadyExistsError", "UnknownConfigurationKeyError")
        if hasattr(ox, n)
    )  # fmt: skip
    return permanent, (ox.GenericError,)


def status_of(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, S3 error code) that the exception or one under it carries; None where none does."""
    _, generic = _obstore_types()
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):  # botocore ClientError
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            code = (response.get("Error") or {}).get("Code")
            if status or code:
                return (int(status) if status else None), code
        status = getattr(e, "status", None)
        if isinstance(status, int) and 100 <= status < 600:  # aiohttp ClientResponseError
            return status, None
        if generic and isinstance(e, generic):
            m = _OBSTORE_STATUS.search(str(e))
            return (int(m.group(1)) if m else None), None
    return None, None


def _transport_types() -> tuple[type, ...]:
    """Timeouts and broken connections as the HTTP stacks type them."""
    types: list[type] = [TimeoutError, ConnectionError, asyncio.TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        types += [HTTPClientError, BotoConnectionError]  # ReadTimeoutError, ConnectTimeoutError, EndpointConnection..
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
    except ImportError:
        pass
    return tuple(types)


def classify(exc: BaseException) -> Kind:
    """throttle (slow down and retry), transient (retry), or permanent (retrying cannot help)."""
    status, code = status_of(exc)
    if code in THROTTLE_CODES or status in (429, 503):
        return "throttle"
    if status is not None:
        return "transient" if status >= 500 or status == 408 else "permanent"
    permanent, generic = _obstore_types()
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, *permanent)):
        return "permanent"
    if isinstance(exc, _transport_types()):
        return "transient"
    if generic and isinstance(exc, generic):
        return "transient"  # obstore's GenericError without a status: the request never got an answer
    if type(exc) is OSError:  # s3fs's wrapper of an unlisted botocore error, without a cause to read
        return "transient"
    return "permanent"


def is_throttle(exc: BaseException) -> bool:
    return classify(exc) == "throttle"


def is_transient(exc: BaseException) -> bool:
    """Worth another try: throttling, server errors, timeouts, dropped connections. Not: missing objects,
    denied access, bad paths or programming errors."""
    return classify(exc) != "permanent"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 10  # tries per GET, the first included
    concurrency: int = 32  # GETs in flight per process
    base_s: float = BACKOFF_BASE_S
    cap_s: float = BACKOFF_CAP_S
    seed: int | None = None  # jitter seed, for tests

    def delay(self, retry: int, rng: random.Random) -> float:
        """'Full jitter' exponential backoff (AWS architecture blog): uniform in [0, min(cap, base*2^n)]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2**retry))


class ReadError(OSError):
    """A GET that failed for good; names the key and the last error."""


class RetryingStore(WrapperStore[Store]):
    """Read-only wrapper: GETs are capped, retried with backoff, counted; missing keys are remembered."""

    def __init__(self, store: Store, policy: RetryPolicy | None = None) -> None:
        super().__init__(store)
        self.policy = policy or RetryPolicy()
        self._rng = random.Random(self.policy.seed)
        self.missing_keys: set[str] = set()

    def _with_store(self, store: Store) -> RetryingStore:
        return RetryingStore(store, self.policy)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingStore) and self._store == other._store

    def __hash__(self) -> int:
        return id(self)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        retries = throttled = 0
        last: BaseException | None = None
        try:
            for attempt in range(self.policy.attempts):
                if attempt:
                    retries += 1
                    throttled += is_throttle(last)  # type: ignore[arg-type]
                    await asyncio.sleep(self.policy.delay(attempt - 1, self._rng))
                async with _limiter(self.policy.concurrency):
                    t0 = time.perf_counter()
                    try:
                        buf = await self._store.get(key, prototype, byte_range)
                    except Exception as e:  # classified: transient ones are tried again
                        if not is_transient(e):
                            self._count(errors=1)
                            raise ReadError(f"{key}: {type(e).__name__}: {e}") from e
                        last = e
                        continue
                    dt = time.perf_counter() - t0
                if buf is None:
                    self.missing_keys.add(key)
                    self._count(requests=1, missing=1, request_s=dt)
                else:
                    self._count(requests=1, bytes=len(buf), request_s=dt)
                return buf
            self._count(errors=1)
            raise ReadError(
                f"{key}: still failing after {self.policy.attempts} tries: {type(last).__name__}: {last}"
            ) from last
        finally:
            if retries:
                self._count(retries=retries, throttled=throttled)

    @staticmethod
    def _count(**delta: float) -> None:
        stats = process_stats()
        with _LOCK:
            for name, value in delta.items():
                setattr(stats, name, getattr(stats, name) + value)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        return self._store.list_prefix(prefix)

    def __str__(self) -> str:
        return str(self._store)
