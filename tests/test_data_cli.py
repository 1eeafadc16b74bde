"""`seis data synth` and `seis data inspect`, run as the user runs them (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import open_volume


def seis(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_synth_then_inspect(tmp_path: Path) -> None:
    path = tmp_path / "s.mdio"
    r = seis("data", "synth", str(path), "--shape", "16", "24", "40", "--seed", "4", "--chunks", "8", "8", "16")
    assert r.returncode == 0, r.stderr
    assert f"wrote {path}" in r.stdout and "16x24x40 float32" in r.stdout and "chunks 8x8x16" in r.stdout
    vol = open_volume(str(path))
    assert (vol.shape, vol.chunks) == ((16, 24, 40), (8, 8, 16))
    assert np.array_equal(vol.read((0, 0, 0), vol.shape), synthetic_volume((16, 24, 40), 4))

    r = seis("data", "inspect", str(path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "16 x 24 x 40" in out and "8 x 8 x 16 (18 chunks)" in out and "float32" in out
    assert "60.0 KiB" in out  # 16*24*40*4 bytes
    assert "384 of 384 (100.0%)" in out
    s = vol.stats
    assert s is not None
    assert f"{s.count:,}" in out and f"{s.mean:.6g} / {s.std:.6g}" in out and f"{s.min:.6g} / {s.max:.6g}" in out


def test_synth_refuses_existing_path_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "s.mdio"
    assert seis("data", "synth", str(path), "--shape", "8", "8", "8").returncode == 0
    r = seis("data", "synth", str(path), "--shape", "8", "8", "8")
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--overwrite" in r.stderr
    r = seis("data", "synth", str(path), "--shape", "8", "8", "16", "--overwrite", "--compressor", "lz4")
    assert r.returncode == 0, r.stderr
    assert open_volume(str(path)).shape == (8, 8, 16)


def test_bad_input_exits_2(tmp_path: Path) -> None:
    r = seis("data", "inspect", str(tmp_path / "missing.mdio"))
    assert r.returncode == 2
    assert "missing.mdio: does not exist" in r.stderr
    (tmp_path / "notzarr").mkdir()
    r = seis("data", "inspect", str(tmp_path / "notzarr"))
    assert r.returncode == 2 and "no MDIO/Zarr dataset" in r.stderr
    r = seis("data", "synth", str(tmp_path / "x.mdio"), "--shape", "8", "0", "8")
    assert r.returncode == 2 and "--shape 8 0 8: every axis must be >= 1" in r.stderr
    r = seis("data", "synth", str(tmp_path / "x.mdio"), "--shape", "8", "8", "8", "--compressor", "gzip")
    assert r.returncode == 2 and "allowed zstd, lz4, zstd-raw, lz4-raw, none" in r.stderr
    assert not (tmp_path / "x.mdio").exists()


def test_missing_trainer_extras_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['mdio'] = None; from seiscli.launcher.cli import app; "
        f"sys.argv = ['seis', 'data', 'synth', {str(tmp_path / 'x.mdio')!r}, '--shape', '4', '4', '4']; app()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "needs mdio" in r.stderr and "seis[train]" in r.stderr


def test_data_commands_import_nothing_heavy() -> None:
    code = (
        "import sys, seiscli.launcher.cli, seiscli.launcher.cli.data; "
        "heavy = [m for m in ('numpy', 'zarr', 'mdio', 'torch', 'xarray') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -- SEG-Y ingestion (multidimio's importer) and the loader benchmark -------------------------------------------


def write_segy(path: Path, data: np.ndarray, live: np.ndarray) -> None:
    """A SEG-Y rev 1 file, IEEE float samples, inline/crossline at bytes 189/193; dead traces are left out."""
    from segy.factory import SegyFactory
    from segy.schema import ScalarType
    from segy.standards import get_segy_standard

    nz, ny, nt = data.shape
    spec = get_segy_standard(1.0)
    spec.trace.data.format = ScalarType.FLOAT32
    factory = SegyFactory(spec, sample_interval=4000, samples_per_trace=nt)
    il, xl = np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij")
    n = int(live.sum())
    headers = factory.create_trace_header_template(n)
    headers["inline"] = il[live] + 1
    headers["crossline"] = xl[live] + 1
    headers["cdp_x"] = il[live] * 25
    headers["cdp_y"] = xl[live] * 25
    headers["coordinate_scalar"] = 1
    samples = factory.create_trace_sample_template(n)
    samples[:] = data[live]
    path.write_bytes(
        factory.create_textual_header() + factory.create_binary_header() + factory.create_traces(headers, samples)
    )


def test_ingest_segy(tmp_path: Path) -> None:
    data = synthetic_volume((12, 10, 32), 3)
    live = np.ones((12, 10), dtype=bool)
    live[4:7, 2:5] = False  # a hole of dead traces inside the survey
    write_segy(tmp_path / "a.segy", data, live)
    write_segy(tmp_path / "b.segy", -data, np.ones((12, 10), dtype=bool))
    r = seis(
        "data",
        "ingest",
        str(tmp_path / "a.segy"),
        str(tmp_path / "b.segy"),
        str(tmp_path / "out"),
        "--chunks",
        "8",
        "8",
        "16",
    )
    assert r.returncode == 0, r.stderr
    assert "ingested" in r.stdout and "12x10x32 float32" in r.stdout and "chunks 8x8x16" in r.stdout
    vol = open_volume(str(tmp_path / "out" / "a.mdio"))
    assert vol.chunks == (8, 8, 16) and np.array_equal(vol.live_mask(), live)
    x = vol.read((0, 0, 0), vol.shape)
    assert np.array_equal(x[live], data[live]) and np.isnan(x[~live]).all()
    s = vol.stats
    assert s is not None and s.count == live.sum() * 32
    assert s.mean == pytest.approx(float(data[live].astype(np.float64).mean()), abs=1e-6)
    assert np.array_equal(open_volume(str(tmp_path / "out" / "b.mdio")).read((0, 0, 0), (12, 10, 32)), -data)

    r = seis("data", "ingest", str(tmp_path / "a.segy"), str(tmp_path / "out" / "a.mdio"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = seis("data", "ingest", str(tmp_path / "missing.segy"), str(tmp_path / "x.mdio"))
    assert r.returncode == 2 and "missing.segy: no such SEG-Y file" in r.stderr
    r = seis("data", "ingest", str(tmp_path / "a.segy"))
    assert r.returncode == 2 and "at least one SEG-Y file and a destination" in r.stderr


def test_bench_command(tmp_path: Path) -> None:
    path = tmp_path / "v.mdio"
    assert seis("data", "synth", str(path), "--shape", "32", "32", "48", "--chunks", "16", "16", "16").returncode == 0
    r = seis("data", "bench", str(path), "--crop", "16", "16", "32", "--workers", "1", "--seconds", "2")
    assert r.returncode == 0, r.stderr
    assert "MiB/s decoded" in r.stdout and "samples/s of 16x16x32" in r.stdout and "0 retries" in r.stdout
    r = seis("data", "bench", str(path), "--crop", "16", "16", "32", "--client", "boto")
    assert r.returncode == 2 and "--client 'boto': allowed obstore, s3fs" in r.stderr
    r = seis("data", "bench", str(path), "--crop", "64", "64", "64", "--seconds", "1")
    assert r.returncode == 2 and "smaller than data.crop" in r.stderr
