"""`seis data synth` and `seis data inspect`, run as the user runs them (subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

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
    assert r.returncode == 2 and "allowed zstd, lz4, none" in r.stderr
    assert not (tmp_path / "x.mdio").exists()


def test_missing_trainer_extras_is_a_clear_error(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['mdio'] = None; from seiscli.cli import app; "
        f"sys.argv = ['seis', 'data', 'synth', {str(tmp_path / 'x.mdio')!r}, '--shape', '4', '4', '4']; app()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "needs mdio" in r.stderr and "seis[train]" in r.stderr


def test_data_commands_import_nothing_heavy() -> None:
    code = (
        "import sys, seiscli.cli, seiscli.data_cli; "
        "heavy = [m for m in ('numpy', 'zarr', 'mdio', 'torch', 'xarray') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
