"""The data path against SeaweedFS, a production S3 implementation (seiscli.data.seaweed): the loader's crops
equal the local ones with both clients, over HTTP and over HTTPS with a self-signed certificate, and a training
run reads its volumes from it. Fault injection stays with moto and its proxy (tests/test_s3.py)."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seiscli.data.retry import ReadError, RetryPolicy
from seiscli.data.seaweed import SeaweedS3
from seiscli.data.synth import synthetic_volume
from seiscli.data.volume import open_volume
from seiscli.data.write import write_volume
from seiscli.recipe import load_recipe, validate
from seiscli.train.data import build_loader

CPU = torch.device("cpu")
SHAPE = (40, 40, 48)
CHUNKS = (16, 16, 16)


def recipe(uris: list[str], endpoint: str, **data: Any) -> Any:
    d = {"source": "mdio", "uris": uris, "crop": [16, 16, 32], "workers": 0, "endpoint_url": endpoint,
         "min_live_fraction": 0.0, **data}  # fmt: skip
    return validate({"name": "t", "model": {"patch_size": 8}, "data": d, "train": {"micro_batch": 2, "seed": 3}})


def crops(rec: Any, n: int = 3) -> list[torch.Tensor]:
    loader = build_loader(rec, dp_rank=0, dp_size=1, device=CPU)
    try:
        return list(itertools.islice(iter(loader), n))
    finally:
        loader.close()


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_seaweedfs_crops_equal_local_crops(
    seaweed_s3: SeaweedS3, seaweed_bucket: str, tmp_path: Path, client: str
) -> None:
    local, uri = str(tmp_path / "a.mdio"), f"{seaweed_bucket}/a.mdio"
    write_volume(local, synthetic_volume(SHAPE, 1), chunks=CHUNKS)
    write_volume(uri, synthetic_volume(SHAPE, 1), chunks=CHUNKS, storage_options={"endpoint_url": seaweed_s3.endpoint})
    expected = crops(recipe([local], seaweed_s3.endpoint))
    got = crops(recipe([uri], seaweed_s3.endpoint, s3_client=client))
    assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))


@pytest.fixture(scope="module")
def seaweed_tls() -> Iterator[SeaweedS3]:
    server = SeaweedS3(
        tls=True, access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"]
    )
    yield server
    server.stop()


@pytest.mark.parametrize("client", ["obstore", "s3fs"])
def test_https_with_a_private_ca(seaweed_tls: SeaweedS3, client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_CA_BUNDLE names the certificate to trust, for botocore and (through seiscli.data.store) obstore."""
    assert seaweed_tls.endpoint.startswith("https://") and seaweed_tls.ca_file is not None
    monkeypatch.setenv("AWS_CA_BUNDLE", str(seaweed_tls.ca_file))
    bucket = f"tls-{client}"
    seaweed_tls.create_bucket(bucket)
    uri = f"s3://{bucket}/a.mdio"
    data = synthetic_volume(SHAPE, 2)
    write_volume(uri, data, chunks=CHUNKS, storage_options={"endpoint_url": seaweed_tls.endpoint})
    options = {"endpoint_url": seaweed_tls.endpoint, "skip_instance_cache": True}  # no client cached by fsspec
    vol = open_volume(uri, storage_options=options, client=client, policy=RetryPolicy(attempts=1))
    assert np.array_equal(vol.read((0, 0, 0), vol.shape), data)
    monkeypatch.delenv("AWS_CA_BUNDLE")  # without it the private CA's certificate is refused, not ignored
    reopened = pickle.loads(pickle.dumps(vol))  # as a loader worker gets it: its clients are built anew
    with pytest.raises(ReadError, match=r"(?i)certificate|ssl"):
        reopened.read((0, 0, 0), (16, 16, 16))


@pytest.mark.slow
def test_training_reads_from_seaweedfs(seaweed_s3: SeaweedS3, seaweed_bucket: str, tmp_path: Path) -> None:
    ep = seaweed_s3.endpoint
    for name, seed in (("a", 1), ("b", 2)):
        write_volume(f"{seaweed_bucket}/{name}.mdio", synthetic_volume((64, 80, 96), seed), chunks=(32, 32, 32),
                     storage_options={"endpoint_url": ep})  # fmt: skip
    steps = 4
    resolved = load_recipe(
        "smoke",
        {"data.source": "mdio", "data.uris": [f"{seaweed_bucket}/*.mdio"], "data.endpoint_url": ep,
         "data.workers": 1, "train.steps": steps, "cluster.cpu_procs_per_node": 1},
    )  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(resolved.to_yaml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "seiscli.train", str(path), "--run-dir", str(tmp_path / "run")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == list(range(1, steps + 1))
    assert all(np.isfinite(rec["loss"]) for rec in records)
