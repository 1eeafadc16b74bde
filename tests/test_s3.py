"""The data path against a real S3 protocol: moto's server over HTTP, and a proxy in front of it that throttles
(503 SlowDown), drops connections and adds latency. Nothing is patched: obstore and s3fs talk HTTP."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seiscli.data.s3local import FaultProxy, Faults, MotoS3
from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import VolumeError, open_volume
from seiscli.data.write import write_volume
from seiscli.recipe import load_recipe, validate
from seiscli.train.data import CropLoader, build_loader

CPU = torch.device("cpu")
SHAPE = (40, 40, 48)
CHUNKS = (16, 16, 16)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def proxy(s3_server: MotoS3) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_server.endpoint)
    yield p
    p.stop()


def seis(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def put_volumes(bucket: str, endpoint: str, seeds: dict[str, int], shape: tuple[int, int, int] = SHAPE) -> list[str]:
    uris = []
    for name, seed in seeds.items():
        uri = f"{bucket}/{name}.mdio"
        write_volume(uri, synthetic_volume(shape, seed), chunks=CHUNKS, storage_options={"endpoint_url": endpoint})
        uris.append(uri)
    return uris


def recipe(uris: list[str], endpoint: str, **data: Any) -> Any:
    d = {
        "source": "mdio",
        "uris": uris,
        "crop": [16, 16, 32],
        "workers": 0,
        "endpoint_url": endpoint,
        "min_live_fraction": 0.0,
        **data,
    }
    return validate({"name": "t", "model": {"patch_size": 8}, "data": d, "train": {"micro_batch": 2, "seed": 3}})


def take(loader: CropLoader, n: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(loader), n))


def test_synth_inspect_and_overwrite_over_s3(s3_server: MotoS3, s3_bucket: str) -> None:
    uri, ep = f"{s3_bucket}/cli.mdio", s3_server.endpoint
    r = seis(
        "data",
        "synth",
        uri,
        "--shape",
        "16",
        "24",
        "40",
        "--seed",
        "4",
        "--chunks",
        "8",
        "8",
        "16",
        "--endpoint-url",
        ep,
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote {uri}" in r.stdout and "stored)" in r.stdout
    vol = open_volume(uri, endpoint_url=ep)
    assert np.array_equal(vol.read((0, 0, 0), vol.shape), synthetic_volume((16, 24, 40), 4))
    r = seis("data", "inspect", uri, "--endpoint-url", ep)
    assert r.returncode == 0, r.stderr
    assert "16 x 24 x 40" in r.stdout and "8 x 8 x 16 (18 chunks)" in r.stdout and "stored" in r.stdout
    r = seis("data", "synth", uri, "--shape", "8", "8", "8", "--endpoint-url", ep)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = seis("data", "synth", uri, "--shape", "8", "8", "16", "--overwrite", "--endpoint-url", ep)
    assert r.returncode == 0, r.stderr
    assert open_volume(uri, endpoint_url=ep).shape == (8, 8, 16)
    r = seis("data", "inspect", f"{s3_bucket}/missing.mdio", "--endpoint-url", ep)
    assert r.returncode == 2 and "missing.mdio: does not exist" in r.stderr


@pytest.mark.parametrize(("client", "workers"), [("obstore", 0), ("s3fs", 0), ("obstore", 2)])
def test_s3_batches_equal_local_batches(
    s3_server: MotoS3, s3_bucket: str, tmp_path: Path, client: str, workers: int
) -> None:
    uris = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1, "b": 2})
    local = []
    for name, seed in (("a", 1), ("b", 2)):
        local.append(str(tmp_path / f"{name}.mdio"))
        write_volume(local[-1], synthetic_volume(SHAPE, seed), chunks=CHUNKS)
    expected = take(build_loader(recipe(local, s3_server.endpoint), dp_rank=0, dp_size=1, device=CPU), 3)
    loader = build_loader(
        recipe([f"{s3_bucket}/*.mdio"], s3_server.endpoint, s3_client=client, workers=workers),
        dp_rank=0,
        dp_size=1,
        device=CPU,
    )
    assert [v.uri for v in loader.dataset.volumes] == uris
    for x, y in zip(expected, take(loader, 3), strict=True):
        assert torch.equal(x, y)
    s = loader.stats()
    assert s["samples"] == 6 and s["bytes_read"] > 0 and s["requests"] > 0 and s["retries"] == 0
    assert s["decoded_bytes"] == 6 * 16 * 16 * 32 * 4
    assert set(loader.worker_stats()) == ({-1} if workers == 0 else {0, 1})


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_throttling_and_resets_are_retried_and_counted(
    s3_server: MotoS3, s3_bucket: str, proxy: FaultProxy, client: str
) -> None:
    uris = put_volumes(s3_bucket, s3_server.endpoint, {"a": 5})
    expected = take(build_loader(recipe(uris, s3_server.endpoint), dp_rank=0, dp_size=1, device=CPU), 4)
    proxy.faults.slowdown, proxy.faults.reset, proxy.faults.match = 0.3, 0.05, "/amplitude/c/"
    loader = build_loader(recipe(uris, proxy.endpoint, s3_client=client), dp_rank=0, dp_size=1, device=CPU)
    for x, y in zip(expected, take(loader, 4), strict=True):
        assert torch.equal(x, y)  # the same data, however many tries it took
    s = loader.stats()
    injected = proxy.faults.counts
    assert injected["slowdown"] > 0
    assert s["retries"] >= injected["slowdown"] > 0 and s["throttled"] > 0
    assert s["read_errors"] == 0 and s["failed_reads"] == 0 and s["volumes_dropped"] == 0


def test_deleted_volume_is_dropped_and_the_stream_goes_on(
    s3_server: MotoS3, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    uris = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1, "b": 2})
    loader = build_loader(recipe(uris, s3_server.endpoint, workers=2), dp_rank=0, dp_size=1, device=CPU)
    resumed = build_loader(recipe(uris, s3_server.endpoint), dp_rank=0, dp_size=1, device=CPU)
    it = iter(loader)
    for _ in range(2):
        next(it)
    client = s3_server.client()
    bucket = s3_bucket.removeprefix("s3://")
    for obj in client.list_objects_v2(Bucket=bucket, Prefix="b.mdio/")["Contents"]:  # deleted mid-run
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    with caplog.at_level(logging.WARNING, logger="seiscli.train.data"):
        batches = [next(it) for _ in range(12)]
    loader.close()
    assert all(torch.isfinite(b).all() and b.abs().sum() > 0 for b in batches)
    s = loader.stats()
    assert s["volumes_dropped"] == 1 and s["volumes_active"] == 1 and s["failed_reads"] >= 3
    assert any("b.mdio dropped after repeated read failures" in r.getMessage() for r in caplog.records)
    assert loader.state_dict()["dropped"] == [uris[1]]
    # a loader resumed from this state starts without it: every sample comes from a
    resumed.load_state_dict(loader.state_dict())
    take(resumed, 2)
    assert resumed.stats()["failed_reads"] == 0
    assert {resumed.dataset.spec(i).volume for i in range(40)} == {0}


def test_a_volume_that_keeps_failing_is_dropped_not_the_job(
    s3_server: MotoS3, s3_bucket: str, proxy: FaultProxy
) -> None:
    uris = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1, "b": 2})
    proxy.faults.slowdown, proxy.faults.match = 1.0, "/b.mdio/amplitude/c/"  # b is throttled for good
    loader = build_loader(recipe(uris, proxy.endpoint, retries=2), dp_rank=0, dp_size=1, device=CPU)
    batches = take(loader, 6)
    assert all(torch.isfinite(b).all() for b in batches)
    s = loader.stats()
    assert s["volumes_dropped"] == 1 and s["failed_reads"] == 3 and s["read_errors"] >= 3 and s["throttled"] >= 3
    proxy.faults.slowdown = 1.0
    proxy.faults.match = "/amplitude/c/"  # now every volume fails: that is the end of the run, with a clear error
    with pytest.raises(RuntimeError, match="all 2 volumes were dropped"):
        take(build_loader(recipe(uris, proxy.endpoint, retries=1), dp_rank=0, dp_size=1, device=CPU), 4)


def test_missing_dataset_fails_fast(s3_server: MotoS3, s3_bucket: str) -> None:
    ep = s3_server.endpoint
    with pytest.raises(VolumeError, match=r"nothing\.mdio: does not exist"):
        build_loader(recipe([f"{s3_bucket}/nothing.mdio"], ep), dp_rank=0, dp_size=1, device=CPU)
    with pytest.raises(FileNotFoundError, match="matches no dataset"):
        build_loader(recipe([f"{s3_bucket}/none/*.mdio"], ep), dp_rank=0, dp_size=1, device=CPU)


def test_bench_over_s3_reports_decoded_and_fetched_rates(s3_server: MotoS3, s3_bucket: str) -> None:
    (uri,) = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1})
    r = seis("data", "bench", uri, "--crop", "16", "16", "32", "--workers", "1", "--seconds", "2",
             "--endpoint-url", s3_server.endpoint)  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = re.search(
        r"^([\d.]+) MiB/s decoded \(([\d.]+) samples/s of 16x16x32\) over ([\d.]+) s; ([\d.]+) MiB/s fetched "
        r"\(([\d.]+) MiB as stored, (\d+) GETs\), 0 retries",
        r.stdout,
        re.MULTILINE,  # on a line of its own, after the progress table
    )
    assert m, r.stdout
    decoded, samples, seconds, fetched, stored, gets = (float(g) for g in m.groups())
    assert samples > 0 and gets > 0 and stored > 0
    assert decoded == pytest.approx(samples * 16 * 16 * 32 * 4 / 2**20, rel=0.02, abs=0.1)
    # A rate of what was counted: each printed figure is rounded to 0.1, so compare the intervals they stand for.
    lo, hi = (stored - 0.05) / (seconds + 0.05), (stored + 0.05) / (seconds - 0.05)
    assert lo * 0.98 <= fetched + 0.05 and fetched - 0.05 <= hi * 1.02, (fetched, stored, seconds)


def _write_segy(path: Path, data: np.ndarray, live: np.ndarray) -> None:
    from tests.test_data_cli import write_segy

    write_segy(path, data, live)


def test_ingest_segy_to_s3(s3_server: MotoS3, s3_bucket: str, tmp_path: Path) -> None:
    data = synthetic_volume((10, 12, 24), 6)
    live = np.ones((10, 12), dtype=bool)
    live[3:5, 4:9] = False
    _write_segy(tmp_path / "survey.segy", data, live)
    r = seis("data", "ingest", str(tmp_path / "survey.segy"), f"{s3_bucket}/in/", "--endpoint-url", s3_server.endpoint)
    assert r.returncode == 0, r.stderr
    vol = open_volume(f"{s3_bucket}/in/survey.mdio", endpoint_url=s3_server.endpoint)
    assert vol.shape == (10, 12, 24) and np.array_equal(vol.live_mask(), live)
    assert np.array_equal(vol.read((0, 0, 0), vol.shape)[live], data[live])


# -- the trainer, two processes, reading from S3 through the throttling proxy ------------------------------------


@pytest.mark.slow
def test_training_from_s3_survives_throttling_and_a_failing_volume(
    s3_server: MotoS3, s3_bucket: str, proxy: FaultProxy, tmp_path: Path
) -> None:
    ep = s3_server.endpoint
    for name, seed in (("good", 1), ("flaky", 2)):
        r = seis("data", "synth", f"{s3_bucket}/{name}.mdio", "--shape", "64", "80", "96", "--seed", str(seed),
                 "--chunks", "32", "32", "32", "--endpoint-url", ep)  # fmt: skip
        assert r.returncode == 0, r.stderr
    proxy.faults.latency_s, proxy.faults.slowdown, proxy.faults.match = 0.002, 0.1, "/amplitude/c/"
    steps = 6
    resolved = load_recipe(
        "smoke",
        {
            "data.source": "mdio",
            "data.uris": [f"{s3_bucket}/*.mdio"],
            "data.endpoint_url": proxy.endpoint,
            "data.workers": 1,
            "data.retries": 4,
            "train.steps": steps,
        },
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(resolved.to_yaml())
    # the flaky volume answers every chunk GET of its own with 503 once the run has started
    faults = Faults(latency_s=0.002, slowdown=1.0, match="/flaky.mdio/amplitude/c/")
    flaky = FaultProxy(proxy.endpoint, faults)
    path.write_text(resolved.to_yaml().replace(proxy.endpoint, flaky.endpoint))
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "seiscli.train", str(path), "--run-dir", str(tmp_path / "run")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    finally:
        flaky.stop()
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, steps + 1))
    assert all(np.isfinite(rec["loss"]) for rec in records)
    assert proxy.faults.counts["slowdown"] > 0  # throttled GETs were answered with 503 and retried
    assert faults.counts["slowdown"] > 0
    assert "flaky.mdio dropped after repeated read failures" in r.stderr
