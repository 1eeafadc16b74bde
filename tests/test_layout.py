"""The training layout for object storage: the cost arithmetic, sharded volumes read through the coalescing
reader (equal to zarr's own reading and to the data written), `seis data rechunk`, `inspect --crop` and
`ingest --training-layout`, and the same over SeaweedFS."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from seiscli.data.layout import INNER, SHARD, axis_amplification, crop_cost, morton_rank, read_amplification, runs
from seiscli.data.retry import process_stats
from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import DataLossError, open_volume
from seiscli.data.write import write_volume
from seiscli.recipe import load_recipe, validate
from seiscli.train.data import build_loader

SHAPE = (48, 40, 80)
CPU = torch.device("cpu")


def seis(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args], capture_output=True, text=True, env=env, timeout=300
    )


# -- arithmetic ------------------------------------------------------------------------------------------------


def test_amplification_is_the_mean_over_every_origin() -> None:
    for n, crop, chunk in [(100, 30, 8), (64, 64, 16), (97, 10, 32)]:
        brute = []
        for o in range(n - crop + 1):
            first, last = o // chunk, (o + crop - 1) // chunk
            brute.append((min((last + 1) * chunk, n) - first * chunk) / crop)
        assert axis_amplification(n, crop, chunk) == pytest.approx(np.mean(brute))
    assert axis_amplification(64, 64, 16) == 1.0  # the crop is the axis: nothing extra


def test_pretrain_crop_meets_the_amplification_goal_in_the_training_layout() -> None:
    crop = tuple(load_recipe("pretrain").data.crop)
    survey = (768, 768, 1152)
    assert read_amplification(survey, crop, INNER) <= 1.15  # type: ignore[arg-type]
    assert read_amplification(survey, crop, (128, 128, 128)) > 1.5  # type: ignore[arg-type]  (today's MDIO chunks)
    ours = crop_cost(survey, crop, INNER, SHARD, samples=4)  # type: ignore[arg-type]
    morton = crop_cost(survey, crop, INNER, SHARD, samples=4, order="morton")  # type: ignore[arg-type]
    # one GET per (inline, crossline) row of inner chunks: (640 / 32 + 1)^2 at a random origin
    assert ours.gets == 441 and morton.gets > 2 * ours.gets
    assert ours.mean_get_bytes > 4e6 and ours.amplification == read_amplification(survey, crop, INNER)  # type: ignore[arg-type]


def test_morton_rank_is_zarrs_write_order() -> None:
    from zarr.core.indexing import _morton_order

    for grid in [(4, 4, 8), (3, 5, 2), (1, 4, 4)]:
        rank = morton_rank(grid)
        order = [tuple(int(v) for v in c) for c in np.asarray(_morton_order(grid))]
        assert [rank[c] for c in order] == list(range(len(order)))


def test_runs_merge_adjacent_ranges_up_to_the_cap() -> None:
    starts, sizes = np.array([30, 0, 10, 50]), np.array([10, 10, 10, 5])
    assert runs(starts, sizes, 0, 100) == [(0, 20), (30, 40), (50, 55)]
    assert runs(starts, sizes, 10, 100) == [(0, 55)]
    assert runs(starts, sizes, 10, 30) == [(0, 20), (30, 55)]


# -- sharded volumes -------------------------------------------------------------------------------------------


def _live() -> np.ndarray:
    live = np.ones(SHAPE[:2], dtype=bool)
    live[5:13, 20:37] = False
    return live


@pytest.mark.parametrize("compressor", ["lz4", "zstd-raw", "lz4-raw", "none"])
def test_sharded_crops_equal_the_data(tmp_path: Path, compressor: str) -> None:
    data, live = synthetic_volume(SHAPE, 3), _live()
    uri = str(tmp_path / "s.mdio")
    write_volume(uri, data, chunks=(8, 8, 16), shards=(16, 16, 32), compressor=compressor, live_mask=live)  # type: ignore[arg-type]
    vol = open_volume(uri)
    assert vol.info.shards == (16, 16, 32) and vol.chunks == (8, 8, 16)
    expected = np.where(live[:, :, None], data, np.nan)
    reference = zarr.open_group(uri, mode="r")["amplitude"]  # zarr's own sharding codec
    rng = random.Random(0)
    for _ in range(12):
        shape = tuple(rng.randint(1, n) for n in SHAPE)
        origin = tuple(rng.randint(0, n - s) for n, s in zip(SHAPE, shape, strict=True))
        box = tuple(slice(o, o + s) for o, s in zip(origin, shape, strict=True))
        got = vol.read(origin, shape)  # type: ignore[arg-type]
        assert np.array_equal(got, expected[box], equal_nan=True)
        assert np.array_equal(got, reference[box], equal_nan=True)
    assert vol._reader is not None and vol._reader.write_order() == "c"  # our writer, and our reader read it


def test_a_sharded_volume_keeps_its_label_arrays(tmp_path: Path) -> None:
    """write_volume's `shards` (the training layout) and `labels` (fault masks beside the amplitudes) together."""
    from seiscli.data.write import FAULTS

    data = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    faults = (data > 1).astype(np.uint8)
    uri = str(tmp_path / "v.mdio")
    written = write_volume(uri, data, chunks=(16, 16, 16), shards=(32, 32, 32), labels={FAULTS: faults})
    group = zarr.open_group(uri, mode="r")
    assert written.shards == (32, 32, 32) and group["amplitude"].shards == (32, 32, 32)
    assert np.array_equal(group["amplitude"][...], data) and np.array_equal(group[FAULTS][...], faults)
    with pytest.raises(ValueError, match="label 'fault_mask' has shape"):
        write_volume(str(tmp_path / "w.mdio"), data, labels={FAULTS: faults[:3]})
    assert not (tmp_path / "w.mdio").exists()  # refused before anything was written


def test_a_crop_is_coalesced_into_few_gets(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.mdio")
    write_volume(uri, synthetic_volume(SHAPE, 1), chunks=(8, 8, 8), shards=(16, 16, 32), compressor="lz4")
    vol = open_volume(uri)
    vol.read((0, 0, 0), (1, 1, 1))  # shard index of shard (0,0,0) now cached
    process_stats().take()
    vol.read((0, 0, 0), (16, 16, 32))  # exactly one shard: one GET of the whole object
    assert process_stats().take().requests == 1
    vol.read((3, 3, 3), (20, 20, 40))  # 4 x 4 x 6 = 96 inner chunks in 2 x 2 x 2 shards
    got = process_stats().take().requests
    assert 8 <= got < 96  # indexes of the 7 new shards + coalesced runs, far fewer than one GET per inner chunk


def test_missing_shard_is_fill_under_dead_traces_and_data_loss_under_live(tmp_path: Path) -> None:
    live = np.ones(SHAPE[:2], dtype=bool)
    live[:16, :16] = False  # shard column (0, 0) is all dead
    uri = tmp_path / "s.mdio"
    write_volume(str(uri), synthetic_volume(SHAPE, 2), chunks=(8, 8, 16), shards=(16, 16, 32), live_mask=live)
    assert not (uri / "amplitude/c/0/0/0").exists()  # all fill value: zarr never wrote it
    vol = open_volume(str(uri))
    assert np.isnan(vol.read((0, 0, 0), (16, 16, 32))).all()
    (uri / "amplitude/c/1/1/0").unlink()  # live data lost
    with pytest.raises(DataLossError, match="amplitude/c/1/1/0"):
        open_volume(str(uri)).read((16, 16, 0), (8, 8, 8))


# -- the CLI ---------------------------------------------------------------------------------------------------


def _recipe(uri: str, **data: Any) -> Any:
    d = {"source": "mdio", "uris": [uri], "crop": [16, 16, 32], "workers": 0, "min_live_fraction": 0.0, **data}
    return validate({"name": "t", "model": {"patch_size": 8}, "data": d, "train": {"micro_batch": 2, "seed": 3}})


def _take(rec: Any, n: int = 3) -> list[torch.Tensor]:
    loader = build_loader(rec, dp_rank=0, dp_size=1, device=CPU)
    try:
        return list(itertools.islice(iter(loader), n))
    finally:
        loader.close()


def test_rechunk_then_inspect_and_the_loader_sees_the_same_crops(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "a.mdio"), str(tmp_path / "b.mdio")
    r = seis("data", "synth", src, "--shape", *map(str, SHAPE), "--chunks", "32", "32", "32", "--seed", "5")
    assert r.returncode == 0, r.stderr
    r = seis("data", "rechunk", src, dst, "--chunks", "8", "8", "16", "--shards", "16", "16", "32")
    assert r.returncode == 0, r.stderr
    assert f"rechunked {src} -> {dst}" in r.stdout and "shards 16x16x32 of 8x8x16" in r.stdout
    a, b = open_volume(src), open_volume(dst)
    assert b.info.shards == (16, 16, 32) and b.info.stats == a.info.stats
    assert np.array_equal(a.read((0, 0, 0), SHAPE), b.read((0, 0, 0), SHAPE), equal_nan=True)
    for x, y in zip(_take(_recipe(src)), _take(_recipe(dst)), strict=True):
        assert torch.equal(x, y)
    r = seis("data", "inspect", dst, "--crop", "16", "16", "32")
    assert r.returncode == 0, r.stderr
    expected = read_amplification(SHAPE, (16, 16, 32), (8, 8, 16))
    assert "16 x 16 x 32 (" in r.stdout and f"read amplification {expected:.3f}" in r.stdout
    assert "GETs per crop" in r.stdout and "read whole" in r.stdout
    r = seis("data", "rechunk", src, dst)
    assert r.returncode == 2 and "already exists" in r.stderr


def test_rechunk_bad_options_are_exit_2(tmp_path: Path) -> None:
    for args, message in [
        (["--shards", "20", "16", "32"], "--shards 20 16 32: every axis must be a multiple of --chunks"),
        (["--compressor", "gzip"], "--compressor 'gzip': allowed zstd, lz4, zstd-raw, lz4-raw, none"),
        (["--spread", "-1"], "--spread -1: must be >= 0"),
    ]:
        r = seis("data", "rechunk", str(tmp_path / "a.mdio"), str(tmp_path / "b.mdio"), "--chunks", "8", "8", "16",
                 *args)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_rechunk_spreads_volumes_over_hashed_prefixes(tmp_path: Path) -> None:
    srcs = []
    for i in range(3):
        srcs.append(str(tmp_path / f"v{i}.mdio"))
        write_volume(srcs[-1], synthetic_volume((16, 16, 32), i), chunks=(16, 16, 32))
    r = seis("data", "rechunk", *srcs, str(tmp_path / "out"), "--chunks", "8", "8", "8", "--shards", "16", "16", "32",
             "--spread", "16")  # fmt: skip
    assert r.returncode == 0, r.stderr
    found = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").glob("*/*.mdio"))
    assert sorted(f.split("/")[1] for f in found) == ["v0.mdio", "v1.mdio", "v2.mdio"]
    assert all(len(f.split("/")[0]) == 2 for f in found)


def test_ingest_in_the_training_layout(tmp_path: Path) -> None:
    from tests.test_data_cli import write_segy

    data, live = synthetic_volume((10, 12, 64), 6), np.ones((10, 12), dtype=bool)
    live[2:4, 5:9] = False
    write_segy(tmp_path / "survey.segy", data, live)
    r = seis("data", "ingest", str(tmp_path / "survey.segy"), str(tmp_path / "s.mdio"), "--training-layout")
    assert r.returncode == 0, r.stderr
    vol = open_volume(str(tmp_path / "s.mdio"))
    assert vol.info.shards == (64, 64, 64) and vol.chunks == INNER and "in shards 64x64x64" in r.stdout
    assert np.array_equal(vol.live_mask(), live)
    assert np.array_equal(vol.read((0, 0, 0), vol.shape)[live], data[live])


# -- over a real S3 server -------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_sharded_volume_over_seaweedfs(seaweed_s3: Any, seaweed_bucket: str, tmp_path: Path, client: str) -> None:
    data, live = synthetic_volume(SHAPE, 4), _live()
    local, uri = str(tmp_path / "s.mdio"), f"{seaweed_bucket}/s.mdio"
    for target, opts in ((local, None), (uri, {"endpoint_url": seaweed_s3.endpoint})):
        write_volume(target, data, chunks=(8, 8, 16), shards=(16, 16, 32), live_mask=live, storage_options=opts)
    rec = _recipe(uri, endpoint_url=seaweed_s3.endpoint, s3_client=client)
    for x, y in zip(_take(_recipe(local)), _take(rec), strict=True):
        assert torch.equal(x, y)


# -- the loader's guarantees hold on the training layout ---------------------------------------------------------


def _sharded(tmp_path: Path) -> str:
    uri = str(tmp_path / "s.mdio")
    write_volume(uri, synthetic_volume(SHAPE, 7), chunks=(8, 8, 16), shards=(16, 16, 0), compressor="lz4")
    return uri


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_on_a_sharded_volume(tmp_path: Path, workers: int) -> None:
    rec = _recipe(_sharded(tmp_path), workers=workers, prefetch=2)
    a = build_loader(rec, dp_rank=0, dp_size=1, device=CPU)
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    expected = [next(it) for _ in range(3)]
    a.close()
    b = build_loader(rec, dp_rank=0, dp_size=1, device=CPU)
    b.load_state_dict(state)
    got = list(itertools.islice(iter(b), 3))
    b.close()
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))


def test_cp_slabs_of_a_sharded_volume_equal_the_whole_crop(tmp_path: Path) -> None:
    uri, crop, cp = _sharded(tmp_path), (32, 16, 16), 2
    rec = _recipe(uri, crop=list(crop))
    whole = _take(rec, 3)
    for c in range(cp):
        loader = build_loader(rec, dp_rank=0, dp_size=1, device=CPU, cp_rank=c, cp_size=cp)
        slabs = list(itertools.islice(iter(loader), 3))
        loader.close()
        for w, s in zip(whole, slabs, strict=True):
            torch.testing.assert_close(s, w[:, :, c * 16 : (c + 1) * 16], rtol=0, atol=0)
