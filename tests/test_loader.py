"""The trainer's crop loader, on real MDIO files (synthetic cache and written volumes)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import open_volume
from seiscli.data.write import write_volume
from seiscli.recipe import Recipe, validate
from seiscli.train.data import NORM_BLOCK, CropLoader, build_loader, normalize_

CPU = torch.device("cpu")
SYNTH = (40, 40, 48)
CROP = (16, 16, 32)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_recipe(data: dict[str, Any] | None = None, *, micro_batch: int = 2, seed: int = 0) -> Recipe:
    d = {"source": "synthetic", "synth_shape": list(SYNTH), "crop": list(CROP), "workers": 0, **(data or {})}
    return validate(
        {"name": "t", "model": {"patch_size": 8}, "data": d, "train": {"micro_batch": micro_batch, "seed": seed}}
    )


def take(loader: CropLoader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), n))


def expected_sample(loader: CropLoader, index: int) -> np.ndarray:
    """Sample `index` rebuilt by hand from the volume and its stored statistics."""
    ds = loader.dataset
    spec = ds.spec(index)
    vol = ds.volumes[spec.volume]
    x = vol.read(spec.origin, ds.crop).astype(np.float64)
    if spec.flip_z:
        x = x[::-1]
    if spec.flip_y:
        x = x[:, ::-1]
    if spec.transpose:
        x = x.transpose(1, 0, 2)
    assert vol.stats is not None
    centre, scale = vol.stats.median, vol.stats.robust_std
    return np.nan_to_num(np.clip((x - centre) / scale, -ds.clip, ds.clip), nan=0.0)


def test_batches_are_normalised_crops(data_dir: Path) -> None:
    loader = build_loader(make_recipe({"clip": 3.0}), dp_rank=0, dp_size=1, device=CPU)
    batches = take(loader, 8)
    for b in batches:
        assert b.shape == (2, 1, *CROP) and b.dtype == torch.float32
        assert torch.isfinite(b).all() and b.abs().max() <= 3.0
    for pos in (0, 1, 5):
        got = batches[pos // 2][pos % 2, 0].numpy()
        assert np.allclose(got, expected_sample(loader, pos), atol=1e-5)
    allv = torch.cat(batches)
    assert abs(float(allv.mean())) < 0.3 and 0.6 < float(allv.std()) < 2.0
    assert loader.state_dict()["position"] == 16
    assert any(p.name.startswith("synth-") for p in data_dir.iterdir())


@pytest.mark.parametrize("centre_scale", [(0.25, 1.5), None])
def test_blocked_normalisation_matches_the_whole_array_formula(centre_scale: tuple[float, float] | None) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 70, NORM_BLOCK // 64 + 5)) * 5).astype(np.float32)  # blocks straddle rows
    x[0, 1, :7], x[1, 2, 3], x[2, 3, 4] = np.nan, np.inf, -np.inf
    want = x.copy()
    if centre_scale is not None:
        want = np.clip((want - np.float32(centre_scale[0])) * np.float32(1 / centre_scale[1]), -3.0, 3.0)
    want = np.nan_to_num(want, nan=0.0, posinf=0.0, neginf=0.0)
    got = x.copy()
    normalize_(got, centre_scale, 3.0)
    assert np.array_equal(got, want)  # the same bits, not merely close
    strided = x.copy()[:, ::-1]  # not contiguous: normalised in place as a whole
    normalize_(strided, centre_scale, 3.0)
    assert np.array_equal(strided, want[:, ::-1])


def test_flips_and_transposes_are_drawn_only_when_enabled(data_dir: Path) -> None:
    on = build_loader(make_recipe(), dp_rank=0, dp_size=1, device=CPU).dataset
    specs = [on.spec(i) for i in range(64)]
    for attr in ("flip_z", "flip_y", "transpose"):
        assert {getattr(s, attr) for s in specs} == {True, False}
    off = build_loader(make_recipe({"flips": False}), dp_rank=0, dp_size=1, device=CPU).dataset
    assert not any(s.flip_z or s.flip_y or s.transpose for s in (off.spec(i) for i in range(64)))
    nonsquare = build_loader(make_recipe({"crop": [16, 24, 32]}), dp_rank=0, dp_size=1, device=CPU)
    assert not any(nonsquare.dataset.spec(i).transpose for i in range(64))
    assert take(nonsquare, 1)[0].shape == (2, 1, 16, 24, 32)


def test_deterministic_and_independent_of_workers(data_dir: Path) -> None:
    a = take(build_loader(make_recipe(), dp_rank=1, dp_size=2, device=CPU), 4)
    b = take(build_loader(make_recipe(), dp_rank=1, dp_size=2, device=CPU), 4)
    c = take(build_loader(make_recipe({"workers": 2, "prefetch": 2}), dp_rank=1, dp_size=2, device=CPU), 4)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)
    other_seed = take(build_loader(make_recipe(seed=1), dp_rank=1, dp_size=2, device=CPU), 1)
    assert not torch.equal(a[0], other_seed[0])


def test_ranks_get_different_streams(data_dir: Path) -> None:
    loaders = [build_loader(make_recipe(), dp_rank=r, dp_size=4, device=CPU) for r in range(4)]
    specs = [[(s.origin, s.flip_z, s.flip_y, s.transpose) for s in map(ld.dataset.spec, range(32))] for ld in loaders]
    for r1, r2 in itertools.combinations(range(4), 2):
        same = sum(x == y for x, y in zip(specs[r1], specs[r2], strict=True))
        assert same <= 2, (r1, r2, same)
    first = [take(ld, 1)[0] for ld in loaders]
    assert not any(torch.equal(first[i], first[j]) for i, j in itertools.combinations(range(4), 2))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(data_dir: Path, workers: int) -> None:
    recipe = make_recipe({"workers": workers, "prefetch": 2})
    a = build_loader(recipe, dp_rank=0, dp_size=1, device=CPU)
    it = iter(a)
    for _ in range(3):
        next(it)  # the workers have prefetched beyond these by now
    state = a.state_dict()
    assert state["position"] == 6
    expected = [next(it) for _ in range(3)]
    b = build_loader(recipe, dp_rank=0, dp_size=1, device=CPU)
    b.load_state_dict(state)
    for x, y in zip(expected, take(b, 3), strict=True):
        assert torch.equal(x, y)
    # position counts samples, so a resumed run may even change its micro-batch
    c = build_loader(make_recipe({"workers": workers}, micro_batch=3), dp_rank=0, dp_size=1, device=CPU)
    c.load_state_dict(state)
    assert torch.equal(torch.cat(take(c, 2)), torch.cat(expected))


def test_state_mismatch_and_stale_iterators(data_dir: Path) -> None:
    a = build_loader(make_recipe(), dp_rank=0, dp_size=2, device=CPU)
    with pytest.raises(ValueError, match="seed=1"):
        a.load_state_dict(build_loader(make_recipe(seed=1), dp_rank=0, dp_size=2, device=CPU).state_dict())
    with pytest.raises(ValueError, match="dp_rank=1"):
        a.load_state_dict(build_loader(make_recipe(), dp_rank=1, dp_size=2, device=CPU).state_dict())
    it = iter(a)
    next(it)
    a.load_state_dict({**a.state_dict(), "position": 0})
    with pytest.raises(RuntimeError, match="stale"):
        next(it)
    with pytest.raises(ValueError, match=r"dp_rank 2 is outside 0\.\.1"):
        build_loader(make_recipe(), dp_rank=2, dp_size=2, device=CPU)


def test_close_stops_workers_and_iteration_resumes(data_dir: Path) -> None:
    import multiprocessing as mp

    before = set(mp.active_children())
    loader = build_loader(make_recipe({"workers": 2}), dp_rank=0, dp_size=1, device=CPU)
    it = iter(loader)
    next(it)
    workers = set(mp.active_children()) - before
    assert len(workers) == 2
    loader.close()
    assert not any(p.is_alive() for p in workers)
    assert loader.position == 2
    reference = take(build_loader(make_recipe(), dp_rank=0, dp_size=1, device=CPU), 2)[1]
    assert torch.equal(next(iter(loader)), reference)  # a new iterator starts where the closed one stopped
    loader.close()


# -- MDIO sources --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vols")
    big = synthetic_volume((64, 64, 32), seed=1)
    mask = np.ones((64, 64), dtype=bool)
    mask[:, 32:] = False  # half of the big survey is dead
    write_volume(str(root / "a.mdio"), big, chunks=(32, 32, 32), live_mask=mask)
    write_volume(str(root / "b.mdio"), synthetic_volume((32, 32, 32), seed=2), chunks=(32, 32, 32))
    patch = np.zeros((32, 32), dtype=bool)
    patch[10:14, 10:14] = True  # 16 live traces: no 16x16 crop is half live
    write_volume(str(root / "dead" / "c.mdio"), synthetic_volume((32, 32, 32), seed=3), live_mask=patch)
    write_volume(
        str(root / "dead" / "d.mdio"), synthetic_volume((32, 32, 32), seed=4), live_mask=np.zeros((32, 32), dtype=bool)
    )
    return root


def mdio_recipe(uris: list[str], **data: Any) -> Recipe:
    return make_recipe({"source": "mdio", "uris": uris, "crop": [16, 16, 16], **data})


def test_mostly_dead_crops_are_skipped(volumes: Path) -> None:
    strict = build_loader(
        mdio_recipe([str(volumes / "a.mdio")], min_live_fraction=0.9), dp_rank=0, dp_size=1, device=CPU
    )
    specs = [strict.dataset.spec(i) for i in range(200)]
    assert min(s.live_fraction for s in specs) >= 0.9
    lax = build_loader(mdio_recipe([str(volumes / "a.mdio")], min_live_fraction=0.0), dp_rank=0, dp_size=1, device=CPU)
    assert sum(lax.dataset.spec(i).live_fraction < 0.5 for i in range(200)) > 50  # the filter is what avoids them
    batch = take(strict, 1)[0]
    assert torch.isfinite(batch).all()
    assert np.allclose(batch[0, 0].numpy(), expected_sample(strict, 0), atol=1e-5)


def test_dead_volumes_are_clear_errors(volumes: Path) -> None:
    loader = build_loader(mdio_recipe([str(volumes / "dead" / "c.mdio")]), dp_rank=0, dp_size=1, device=CPU)
    with pytest.raises(RuntimeError, match=r"no crop .* live traces"):
        take(loader, 1)
    with pytest.raises(ValueError, match=r"d\.mdio has no live samples"):
        build_loader(mdio_recipe([str(volumes / "dead" / "d.mdio")]), dp_rank=0, dp_size=1, device=CPU)


def test_volumes_weighted_by_live_size_and_globbed(volumes: Path) -> None:
    loader = build_loader(
        mdio_recipe([str(volumes / "*.mdio")], min_live_fraction=0.0), dp_rank=0, dp_size=1, device=CPU
    )
    ds = loader.dataset
    assert [Path(v.uri).name for v in ds.volumes] == ["a.mdio", "b.mdio"]
    # a has 64*32 live traces, b 32*32: a is drawn 2/3 of the time
    share = np.mean([ds.spec(i).volume == 0 for i in range(3000)])
    assert share == pytest.approx(2 / 3, abs=0.04)
    b = take(loader, 2)
    assert all(t.shape == (2, 1, 16, 16, 16) for t in b)


def test_mdio_source_errors(volumes: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matches no dataset"):
        build_loader(mdio_recipe([str(tmp_path / "*.mdio")]), dp_rank=0, dp_size=1, device=CPU)
    with pytest.raises(ValueError, match=r"b\.mdio .* is smaller"):
        build_loader(
            make_recipe({"source": "mdio", "uris": [str(volumes / "b.mdio")], "crop": [48, 48, 16]}),
            dp_rank=0,
            dp_size=1,
            device=CPU,
        )
    import zarr

    bare = tmp_path / "nostats.mdio"
    write_volume(str(bare), synthetic_volume((16, 16, 16), seed=0))
    del zarr.open_group(str(bare), mode="r+")["amplitude"].attrs["statsV1"]
    with pytest.raises(ValueError, match="no statsV1"):
        build_loader(mdio_recipe([str(bare)]), dp_rank=0, dp_size=1, device=CPU)
    plain = build_loader(mdio_recipe([str(bare)], normalization="none"), dp_rank=0, dp_size=1, device=CPU)
    x = take(plain, 1)[0][0, 0].numpy()
    spec = plain.dataset.spec(0)
    raw = open_volume(str(bare)).read(spec.origin, (16, 16, 16))
    assert np.isclose(np.sort(x.ravel()), np.sort(raw.ravel())).all()  # raw values, only flipped


# -- several processes creating the synthetic cache at once ----------------------------------------

_RACER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from seiscli.data.cache import create_once, synthetic_path
    from seiscli.data.synth import synthetic_volume
    from seiscli.data.write import write_volume

    root, me, n, lock = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    shape, chunks = (24, 24, 40), (16, 16, 16)
    final = synthetic_path(shape, 7, chunks, root)
    (root / f"ready-{me}").touch()
    while len(list(root.glob("ready-*"))) < n:  # start together
        time.sleep(0.005)
    write = lambda tmp: write_volume(str(tmp), synthetic_volume(shape, 7), chunks=chunks)
    print(json.dumps({"created": create_once(final, write, lock=lock), "path": str(final)}))
    """
)


@pytest.mark.parametrize("lock", [True, False])
def test_concurrent_cache_creation_is_atomic(tmp_path: Path, lock: bool) -> None:
    n = 3
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), str(i), str(n), "1" if lock else "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for i in range(n)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["created"] for r in results) == 1
    path = results[0]["path"]
    assert {r["path"] for r in results} == {path}
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == []
    vol = open_volume(path)
    assert np.array_equal(vol.read((0, 0, 0), vol.shape), synthetic_volume((24, 24, 40), 7))


# -- data.align_crops ------------------------------------------------------------------------------

GRID = (8, 8, 8)


@pytest.fixture(scope="module")
def gridded(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40x44x32 in 8^3 chunks: 44 is not a multiple of 8, so the last aligned y origin is 24, not 28."""
    uri = str(tmp_path_factory.mktemp("grid") / "g.mdio")
    write_volume(uri, synthetic_volume((40, 44, 32), seed=5), chunks=GRID)
    return uri


def test_aligned_origins_are_on_the_chunk_grid_and_cover_it_uniformly(gridded: str) -> None:
    ds = build_loader(mdio_recipe([gridded], align_crops=True), dp_rank=0, dp_size=1, device=CPU).dataset
    origins = [ds.spec(i).origin for i in range(2400)]
    assert all(o % g == 0 for origin in origins for o, g in zip(origin, GRID, strict=True))
    # every aligned position with the crop inside the volume: z 0..24, y 0..24, x 0..16 in steps of 8
    every = set(itertools.product(range(0, 25, 8), range(0, 25, 8), range(0, 17, 8)))
    counts = {o: origins.count(o) for o in every}
    assert set(origins) == every  # 48 positions, each drawn ~50 times
    assert min(counts.values()) > 20 and max(counts.values()) < 90
    default = build_loader(mdio_recipe([gridded]), dp_rank=0, dp_size=1, device=CPU).dataset
    unaligned = {default.spec(i).origin for i in range(200)}
    assert any(o % g for origin in unaligned for o, g in zip(origin, GRID, strict=True))  # off by default
    assert len(unaligned) > len(every)


def test_aligned_crops_read_exactly_the_chunks_they_cover(gridded: str) -> None:
    per_crop = {}
    for align in (True, False):
        loader = build_loader(mdio_recipe([gridded], align_crops=align), dp_rank=0, dp_size=1, device=CPU)
        it = iter(loader)
        next(it)  # opens the array: metadata GETs are not crop reads
        before = loader.stats()
        batches = [next(it) for _ in range(10)]
        after = loader.stats()
        per_crop[align] = (after["requests"] - before["requests"]) / (after["samples"] - before["samples"])
        assert after["missing_chunks"] == before["missing_chunks"]  # every chunk is there: GETs = chunks
        for pos in (2, 7):  # still the right normalised, flipped crops
            got = batches[pos // 2 - 1][pos % 2, 0].numpy()
            assert np.allclose(got, expected_sample(loader, pos), atol=1e-5)
    assert per_crop[True] == 2 * 2 * 2  # crop 16^3 over 8^3 chunks
    assert per_crop[False] > 8  # random origins straddle chunk edges: more GETs per crop


def test_aligned_crops_keep_dead_trace_skipping_and_resume(volumes: Path) -> None:
    # a.mdio: 64x64x32 in 32^3 chunks, traces with y >= 32 dead; aligned 32^3 crops sit at y 0 or 32
    recipe = mdio_recipe([str(volumes / "a.mdio")], crop=[32, 32, 32], align_crops=True, min_live_fraction=0.5)
    loader = build_loader(recipe, dp_rank=0, dp_size=1, device=CPU)
    specs = [loader.dataset.spec(i) for i in range(64)]
    assert {s.origin for s in specs} == {(0, 0, 0), (32, 0, 0)} and min(s.live_fraction for s in specs) == 1.0
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(2)]
    resumed = build_loader(recipe, dp_rank=0, dp_size=1, device=CPU)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, take(resumed, 2), strict=True))


def test_align_crops_needs_a_crop_that_is_a_multiple_of_the_chunks(volumes: Path) -> None:
    a = str(volumes / "a.mdio")  # 32^3 chunks: a 16^3 crop would still read whole chunks around it
    with pytest.raises(
        ValueError, match=r"data\.align_crops: crop \(16, 16, 16\) .* chunk shape \(32, 32, 32\) of .*a\.mdio"
    ):
        build_loader(mdio_recipe([a], align_crops=True), dp_rank=0, dp_size=1, device=CPU)
    build_loader(mdio_recipe([a]), dp_rank=0, dp_size=1, device=CPU)  # fine unaligned


# -- context parallelism: each rank reads only its slab ----------------------------------------------------


@pytest.mark.parametrize("cp", [2, 4])
def test_each_cp_rank_reads_its_slab_of_the_same_crop(data_dir: Path, cp: int) -> None:
    """Slab c of every sample, read on its own (flips and transposes included), equals the c-th 1/cp of the
    whole crop along z: a cp group sees one sample between its ranks while each reads 1/cp of it."""
    crop = (32, 16, 16)  # 4 patch planes along z
    recipe = make_recipe({"crop": list(crop)})
    whole = take(build_loader(recipe, dp_rank=1, dp_size=2, device=CPU), 4)
    sz = crop[0] // cp
    for c in range(cp):
        slabs = take(build_loader(recipe, dp_rank=1, dp_size=2, device=CPU, cp_rank=c, cp_size=cp), 4)
        for w, s in zip(whole, slabs, strict=True):
            assert s.shape == (2, 1, sz, crop[1], crop[2])
            torch.testing.assert_close(s, w[:, :, c * sz : (c + 1) * sz], rtol=0, atol=0)
