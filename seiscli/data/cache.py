"""Create-once datasets in a local cache directory, safe when many ranks start at the same moment.

The dataset is written into a private temporary directory next to its final place and renamed into
place: a rename is atomic on one filesystem, so a reader sees either nothing or a complete dataset.
An advisory lock (flock) makes the other local processes wait instead of all generating the same
data; where flock does not work (some network filesystems), the rename alone still keeps it correct.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from seiscli.data.synth import Shape3

SYNTH_VERSION = 2  # bump when the generator changes, so stale caches are not reused (2: fault labels)


def data_dir() -> Path:
    return Path(os.environ.get("SEIS_DATA_DIR") or Path.home() / ".cache" / "seis" / "data")


def synthetic_path(shape: Shape3, seed: int, chunks: Shape3, root: Path | None = None) -> Path:
    z, y, x = shape
    c = "x".join(map(str, chunks))
    return (root or data_dir()) / f"synth-v{SYNTH_VERSION}-{z}x{y}x{x}-seed{seed}-c{c}.mdio"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # no flock here: rely on the atomic rename
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def create_once(final: Path, write: Callable[[Path], None], *, lock: bool = True) -> bool:
    """Make `final` by `write(tmp)` + rename unless it exists. True if this call created it."""
    if final.exists():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    guard = _flock(final.with_name(final.name + ".lock")) if lock else contextlib.nullcontext()
    with guard:
        if final.exists():  # another process made it while we waited
            return False
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            write(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                return False  # lost the race to a process that did not hold the lock
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return True


def ensure_synthetic(shape: Shape3, seed: int, chunks: Shape3, *, root: Path | None = None, lock: bool = True) -> Path:
    """The cached synthetic MDIO volume for (shape, seed, chunks), created on first use."""
    from seiscli.data.synth import fault_labels, synthetic_volume
    from seiscli.data.write import FAULTS, write_volume

    final = synthetic_path(shape, seed, chunks, root)

    def write(tmp: Path) -> None:
        labels = {FAULTS: fault_labels(shape, seed)}
        write_volume(str(tmp), synthetic_volume(shape, seed), chunks=chunks, name=final.stem, labels=labels)

    create_once(final, write, lock=lock)
    return final
