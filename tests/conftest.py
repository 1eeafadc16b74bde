"""Shared pytest fixtures. Each section is self-contained and names its owner; edit only your own."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest

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
