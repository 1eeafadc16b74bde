"""Writing MDIO volumes and reading boxes back, through real zarr/MDIO files."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest

from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import Volume, VolumeError, open_volume
from seiscli.data.write import write_volume

SHAPE = (20, 28, 36)
CHUNKS = (8, 16, 16)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return synthetic_volume(SHAPE, seed=11)


@pytest.fixture(scope="module")
def half_dead(tmp_path_factory: pytest.TempPathFactory, data: np.ndarray) -> tuple[str, np.ndarray]:
    mask = np.ones(SHAPE[:2], dtype=bool)
    mask[:, 20:] = False  # the last 8 crosslines are dead
    mask[3, 4] = False
    uri = str(tmp_path_factory.mktemp("vol") / "dead.mdio")
    write_volume(uri, data, chunks=CHUNKS, live_mask=mask)
    return uri, mask


def test_round_trip_boxes(tmp_path: Path, data: np.ndarray) -> None:
    uri = str(tmp_path / "v.mdio")
    w = write_volume(uri, data, chunks=CHUNKS)
    assert (w.shape, w.chunks, w.live_traces) == (SHAPE, CHUNKS, SHAPE[0] * SHAPE[1])
    vol = open_volume(uri)
    assert (vol.shape, vol.chunks, vol.dtype) == (SHAPE, CHUNKS, np.dtype("float32"))
    assert vol.info.variable == "amplitude" and vol.info.has_mask
    rng = np.random.default_rng(0)
    for _ in range(20):  # boxes aligned and unaligned with the chunk grid
        shape = tuple(int(rng.integers(1, n + 1)) for n in SHAPE)
        origin = tuple(int(rng.integers(0, n - s + 1)) for n, s in zip(SHAPE, shape, strict=True))
        box = vol.read(origin, shape)
        expect = data[tuple(slice(o, o + s) for o, s in zip(origin, shape, strict=True))]
        assert box.dtype == np.float32 and np.array_equal(box, expect)
    assert np.array_equal(vol.read((0, 0, 0), SHAPE), data)


def test_stats_match_the_data(tmp_path: Path, data: np.ndarray) -> None:
    uri = str(tmp_path / "v.mdio")
    write_volume(uri, data, chunks=CHUNKS)
    s = open_volume(uri).stats
    assert s is not None
    x = data.astype(np.float64)
    assert s.count == data.size
    assert s.mean == pytest.approx(x.mean(), rel=1e-6, abs=1e-9)
    assert s.std == pytest.approx(x.std(), rel=1e-6)
    assert (s.min, s.max) == (float(data.min()), float(data.max()))
    assert sum(s.counts) == data.size
    width = (s.max - s.min) / len(s.counts)
    assert s.median == pytest.approx(float(np.median(data)), abs=width)


def test_dead_traces_are_nan_masked_and_left_out_of_stats(half_dead: tuple[str, np.ndarray], data: np.ndarray) -> None:
    uri, mask = half_dead
    vol = open_volume(uri)
    assert np.array_equal(vol.live_mask(), mask)
    full = vol.read((0, 0, 0), SHAPE)
    assert np.isnan(full[~mask]).all()
    assert np.array_equal(full[mask], data[mask])
    s = vol.stats
    assert s is not None
    live = data[mask].astype(np.float64)
    assert s.count == live.size
    assert s.mean == pytest.approx(live.mean(), rel=1e-6, abs=1e-9)
    assert (s.min, s.max) == (float(live.min()), float(live.max()))
    assert vol.live_fraction((0, 16), (4, 8)) == pytest.approx(0.5)
    assert vol.live_fraction((0, 0), (20, 20)) == pytest.approx(399 / 400)


def test_readable_by_mdio_itself(half_dead: tuple[str, np.ndarray], data: np.ndarray) -> None:
    from mdio import open_mdio
    from mdio.builder.schemas.v1.stats import SummaryStatistics

    uri, mask = half_dead
    ds = open_mdio(uri)
    assert ds.attrs["attributes"]["defaultVariableName"] == "amplitude"
    assert ds["amplitude"].dims == ("inline", "crossline", "time")
    assert np.array_equal(ds["trace_mask"].values, mask)
    assert np.array_equal(ds["inline"].values, np.arange(1, SHAPE[0] + 1))
    amp = ds["amplitude"].values
    assert np.array_equal(amp[mask], data[mask])
    stats = SummaryStatistics.model_validate_json(ds["amplitude"].attrs["statsV1"])
    assert stats.count == int(mask.sum()) * SHAPE[2]


@pytest.mark.parametrize("compressor", ["lz4", "none"])
def test_compressors(tmp_path: Path, data: np.ndarray, compressor: str) -> None:
    import zarr

    uri = str(tmp_path / f"{compressor}.mdio")
    write_volume(uri, data, chunks=CHUNKS, compressor=compressor)  # type: ignore[arg-type]
    arr = zarr.open_group(uri, mode="r")["amplitude"]
    names = [type(c).__name__ for c in arr.compressors]
    assert names == ([] if compressor == "none" else ["BloscCodec"])
    assert np.array_equal(open_volume(uri).read((0, 0, 0), SHAPE), data)


def test_write_refuses_to_overwrite_unless_asked(tmp_path: Path, data: np.ndarray) -> None:
    uri = str(tmp_path / "v.mdio")
    write_volume(uri, data, chunks=CHUNKS)
    with pytest.raises(FileExistsError, match="already exists"):
        write_volume(uri, data, chunks=CHUNKS)
    write_volume(uri, -data, chunks=CHUNKS, overwrite=True)
    assert np.array_equal(open_volume(uri).read((0, 0, 0), SHAPE), -data)


def test_write_rejects_bad_input(tmp_path: Path, data: np.ndarray) -> None:
    with pytest.raises(ValueError, match="has 2 axes; a volume needs 3"):
        write_volume(str(tmp_path / "a.mdio"), data[0])
    with pytest.raises(ValueError, match="live_mask shape"):
        write_volume(str(tmp_path / "b.mdio"), data, live_mask=np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="compressor 'gzip'"):
        write_volume(str(tmp_path / "c.mdio"), data, compressor="gzip")  # type: ignore[arg-type]


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="does not exist"):
        open_volume(str(tmp_path / "missing.mdio"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeError, match="no MDIO/Zarr dataset"):
        open_volume(str(tmp_path / "empty"))


def test_box_outside_volume(half_dead: tuple[str, np.ndarray]) -> None:
    vol = open_volume(half_dead[0])
    with pytest.raises(ValueError, match="exceeds"):
        vol.read((15, 0, 0), (8, 4, 4))
    with pytest.raises(ValueError, match="sizes >= 1"):
        vol.read((0, 0, 0), (0, 4, 4))


def _read_in_child(vol: Volume, queue: mp.Queue) -> None:
    queue.put(vol.read((2, 3, 4), (5, 6, 7)))


def test_handles_never_cross_processes(half_dead: tuple[str, np.ndarray], data: np.ndarray) -> None:
    vol = open_volume(half_dead[0])
    vol.read((0, 0, 0), (1, 1, 1))  # the parent holds an open group now
    clone = pickle.loads(pickle.dumps(vol))
    assert clone._group is None and clone._array is None and clone.shape == SHAPE
    assert np.array_equal(clone.read((0, 0, 0), (4, 4, 4)), vol.read((0, 0, 0), (4, 4, 4)))
    ctx = mp.get_context("fork")  # a forked child inherits the parent's handle and must reopen its own
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(vol, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    expect = np.where(half_dead[1][2:7, 3:9, None], data[2:7, 3:9, 4:11], np.nan)
    assert np.array_equal(got, expect, equal_nan=True)
