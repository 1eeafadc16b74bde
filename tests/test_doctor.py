"""`seis doctor`: on the real local Slurm cluster, and its storage checks against a real MDIO volume and a real
local S3 server (moto over HTTP). Checks that cannot pass here (EFA, HyperPod, pyxis) must say so, not pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from seiscli.launcher.doctor import Check, run_checks
from seiscli.launcher.profiles import load_recipe_for_cluster


def doctor(*args: str, runs: Path, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    out = subprocess.run(
        [sys.executable, "-m", "seiscli", "doctor", *args, "--json", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )
    assert out.stdout, out.stderr
    report = json.loads(out.stdout)
    rows = {r["name"]: r for r in report["checks"]}
    assert report["ok"] == (out.returncode == 0) and report["ok"] == all(r["status"] != "fail" for r in rows.values())
    return out.returncode, rows


def local_profile(tmp_path: Path, **fields: Any) -> str:
    """The local test cluster described as a HyperPod Slurm cluster: 2 nodes of the `debug` partition, no GPUs."""
    path = tmp_path / "local-hyperpod.yaml"
    base = {"type": "hyperpod-slurm", "partition": "debug", "nodes": 2, "gpus_per_node": 0, "shared_dir": str(tmp_path)}
    path.write_text(yaml.safe_dump(base | fields))
    return str(path)


# -- on the local Slurm cluster ----------------------------------------------------------------------------


@pytest.mark.slurm(nodes=2)
def test_plain_slurm_passes_with_honest_warnings(tmp_path: Path) -> None:
    code, rows = doctor("smoke", "--set", "cluster.backend=slurm", "--nodes", "2", runs=tmp_path / "runs")
    assert code == 0, rows
    assert list(rows) == ["recipe", "slurm", "partition", "gpus", "efa", "image", "data", "checkpoint"]
    for name in ("recipe", "slurm", "gpus", "image", "data", "checkpoint"):
        assert rows[name]["status"] == "pass", rows[name]
    assert rows["partition"]["status"] in ("pass", "warn")  # warn while other tests' jobs hold a node
    assert rows["partition"]["detail"].startswith("partition debug: 2 nodes (")
    assert rows["efa"]["status"] == "warn"  # no EFA on this machine: said, not faked


@pytest.mark.slurm(nodes=2)
def test_hyperpod_profile_on_a_cluster_that_is_not_hyperpod(tmp_path: Path) -> None:
    profile = local_profile(tmp_path, container_image=str(tmp_path / "images" / "seis.sqsh"))
    code, rows = doctor("smoke", "--cluster", profile, "--nodes", "2", runs=tmp_path / "runs")
    assert code == 1
    assert rows["recipe"]["status"] == "pass" and "hyperpod-slurm, 2 node(s) x 2" in rows["recipe"]["detail"]
    assert rows["slurm"]["status"] == "pass" and rows["gpus"]["status"] == "pass"
    assert rows["hyperpod"]["status"] == "warn" and "without auto-resume" in rows["hyperpod"]["detail"]
    assert rows["pyxis"]["status"] == "fail" and "pyxis" in rows["pyxis"]["detail"]
    assert rows["image"]["status"] == "fail" and "enroot import -o" in rows["image"]["fix"]
    assert rows["shared_dir"]["status"] == "pass"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "seis.sqsh").write_bytes(b"\0" * 1024)
    _, rows = doctor("smoke", "--cluster", profile, runs=tmp_path / "runs")
    assert rows["image"]["status"] == "pass"


@pytest.mark.slurm(nodes=2)
def test_misfits_and_missing_partitions_fail(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    code, rows = doctor("smoke", "--cluster", local_profile(tmp_path), "--nodes", "3", runs=runs)
    assert code == 1 and list(rows) == ["recipe"]
    assert (
        rows["recipe"]["detail"]
        == "cluster.nodes=3 exceeds the 2 nodes of cluster profile 'local-hyperpod' (partition debug)"
    )
    code, rows = doctor("smoke", "--set", "cluster.backend=slurm", "--nodes", "3", runs=runs)
    assert code == 1 and rows["partition"]["status"] == "fail" and rows["partition"]["fix"] == "use at most --nodes 2"
    code, rows = doctor("smoke", "--set", "cluster.backend=slurm", "--set", "cluster.partition=gpu", runs=runs)
    assert code == 1 and rows["partition"]["detail"] == "partition 'gpu': not found; here: debug*"
    code, rows = doctor("smoke", "--set", "cluster.backend=slurm", "--set", "cluster.gpus_per_node=8", runs=runs)
    assert code == 1 and rows["gpus"]["status"] == "fail" and "nodes have [0] (gres)" in rows["gpus"]["detail"]


# -- storage, with real components -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> str:
    from seiscli.data.write import write_volume

    path = str(tmp_path_factory.mktemp("vol") / "v.mdio")
    data = np.random.default_rng(0).standard_normal((64, 64, 96)).astype(np.float32)
    write_volume(path, data, chunks=(32, 32, 64))
    return path


def _rows(tmp_path: Path, overrides: dict[str, Any]) -> dict[str, Check]:
    base = {"cluster.backend": "local", "data.source": "mdio"}
    rows = run_checks(lambda: load_recipe_for_cluster("smoke", base | overrides, None), tmp_path / "runs")
    return {r.name: r for r in rows}


def test_volume_shape_and_chunks(tmp_path: Path, volume: str) -> None:
    ok = _rows(tmp_path, {"data.uris": [volume], "data.crop": [64, 64, 64]})["data"]
    assert ok.status == "pass" and ok.detail.endswith("shape (64, 64, 96), chunks (32, 32, 64), float32")
    small = _rows(tmp_path, {"data.uris": [volume], "data.crop": [96, 64, 64]})["data"]
    assert small.status == "fail" and "smaller than the crop (64 < 96)" in small.detail
    big_chunks = _rows(tmp_path, {"data.uris": [volume], "data.crop": [32, 32, 32]})["data"]
    assert big_chunks.status == "warn" and "64 > 32" in big_chunks.detail
    missing = _rows(tmp_path, {"data.uris": [str(tmp_path / "nope-*.mdio")], "data.crop": [32, 32, 32]})["data"]
    assert missing.status == "fail" and "matches no dataset" in missing.detail


def test_checkpoint_locations(tmp_path: Path) -> None:
    code, rows = doctor("smoke", "--set", "checkpoint.dir=s3://ckpt/runs/x", runs=tmp_path / "runs")
    assert code == 1 and list(rows) == ["recipe"] and "checkpoint.dir" in rows["recipe"]["detail"]
    local = _rows(tmp_path, {"data.source": "synthetic"})["checkpoint"]
    assert local.status == "pass" and str(tmp_path) in local.detail
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere: the permission case only exists for users
        denied = _rows(tmp_path, {"data.source": "synthetic", "checkpoint.dir": str(ro / "ck")})["checkpoint"]
        assert denied.status == "fail"


def test_recipe_refusal_is_a_failed_row(tmp_path: Path) -> None:
    code, rows = doctor("smoke", "--set", "model.encoder_dim=97", runs=tmp_path / "runs")
    assert code == 1 and list(rows) == ["recipe"] and "encoder_dim" in rows["recipe"]["detail"]
