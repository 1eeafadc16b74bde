"""Cluster profiles: lookup, precedence against the recipe and the command line, and misfits refused (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from seiscli.launcher.profiles import (
    ProfileError,
    list_profiles,
    load_profile,
    load_recipe_for_cluster,
    selected_profile,
)
from seiscli.recipe import PROJECT_ROOT

SHIPPED = sorted(p.stem for p in (PROJECT_ROOT / "clusters").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No user profiles, no $SEIS_CLUSTER, and a working directory without clusters/."""
    config = tmp_path / "config"
    monkeypatch.setenv("SEIS_CONFIG_DIR", str(config))
    monkeypatch.delenv("SEIS_CLUSTER", raising=False)
    monkeypatch.chdir(tmp_path)
    return config


def write_profile(config: Path, name: str, **fields: object) -> Path:
    base = {"type": "hyperpod-slurm", "partition": "gpu", "nodes": 16, "gpus_per_node": 8, "cpus_per_node": 192}
    path = config / "clusters" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base | fields))
    return path


def seis(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "seiscli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_fit_the_shipped_recipes(name: str) -> None:
    profile = load_profile(name)
    assert profile.nodes == 16 and profile.gpus_per_node == 8
    for recipe in ("pretrain", "pretrain-long-context"):
        r = load_recipe_for_cluster(recipe, {}, name)
        assert r.cluster.backend == profile.type and r.cluster.profile == name
        assert r.cluster.cpus_per_task == 24  # the recipe's own (192 / 8 would give the same)


def test_precedence_command_line_over_recipe_over_profile(_isolated: Path) -> None:
    write_profile(
        _isolated,
        "p",
        partition="from-profile",
        account="acct",
        container_image="/fsx/img.sqsh",
        env={"A": "profile", "B": "profile"},
        s3={"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"},
        eks={"namespace": "ns", "queue": "q"},
    )
    r = load_recipe_for_cluster("pretrain", {}, "p")
    c = r.cluster
    assert c.partition == "dev"  # the recipe file names one: it wins
    assert c.account == "acct" and c.container_image == "/fsx/img.sqsh"  # silent in the recipe: the profile fills
    assert c.backend == "hyperpod-slurm"  # the profile's type, although the recipe says slurm
    assert c.env == {"A": "profile", "B": "profile"}
    assert (r.data.region, r.data.endpoint_url) == ("eu-west-1", "http://127.0.0.1:9")
    assert (c.eks.namespace, c.eks.queue) == ("ns", "q")
    r = load_recipe_for_cluster(
        "pretrain",
        {"cluster.partition": "cli", "cluster.backend": "slurm", "cluster.env.B": "cli", "cluster.eks.queue": "cli"},
        "p",
    )
    c = r.cluster
    assert (c.partition, c.backend, c.env, c.eks.namespace, c.eks.queue) == (
        "cli",
        "slurm",
        {"A": "profile", "B": "cli"},
        "ns",
        "cli",
    )


def test_recipe_file_values_beat_the_profile(tmp_path: Path, _isolated: Path) -> None:
    write_profile(_isolated, "p", env={"A": "profile"}, container_mounts=["/a:/a"], extra_sbatch=["--exclusive"])
    recipe = yaml.safe_load((PROJECT_ROOT / "recipes" / "smoke.yaml").read_text())
    recipe["cluster"] |= {"env": {"A": "recipe"}, "container_mounts": ["/b:/b"], "gpus_per_node": 0}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(recipe))
    c = load_recipe_for_cluster(str(path), {"cluster.backend": "slurm"}, "p").cluster
    assert c.env == {"A": "recipe"} and c.container_mounts == ["/b:/b"]  # lists are replaced whole
    assert c.extra_sbatch == ["--exclusive"]


def test_lookup_order_and_default(tmp_path: Path, _isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert selected_profile(None) is None
    write_profile(_isolated, "default", nodes=3)
    assert selected_profile(None).name == "default"  # type: ignore[union-attr]
    write_profile(_isolated, "hyperpod-p5", nodes=5)  # a user's copy shadows the shipped one
    assert load_profile("hyperpod-p5").nodes == 5
    local = tmp_path / "clusters" / "hyperpod-p5.yaml"  # ./clusters shadows both
    local.parent.mkdir()
    local.write_text(yaml.safe_dump({"type": "slurm", "nodes": 7, "gpus_per_node": 8}))
    assert load_profile("hyperpod-p5").nodes == 7
    monkeypatch.setenv("SEIS_CLUSTER", "hyperpod-p5")
    assert selected_profile(None).nodes == 7  # type: ignore[union-attr]
    assert selected_profile(str(PROJECT_ROOT / "clusters" / "hyperpod-p5.yaml")).nodes == 16  # type: ignore[union-attr]
    assert {"default", "hyperpod-p5", *SHIPPED} <= set(list_profiles())


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"nodes": 0}, r"field 'nodes': Input should be greater than or equal to 1 \(got 0\)"),
        ({"type": "kubernetes"}, r"field 'type'"),
        ({"partitoin": "x"}, r"field 'partitoin': unknown field"),
    ],
)
def test_bad_profiles_are_one_line_errors(_isolated: Path, fields: dict[str, object], match: str) -> None:
    write_profile(_isolated, "bad", **fields)
    with pytest.raises(ProfileError, match=match):
        load_profile("bad")


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ProfileError, match=r"no cluster profile of that name; known: .*hyperpod-p5"):
        load_profile("nope")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--nodes", "32"],
            "error: cluster.nodes=32 exceeds the 16 nodes of cluster profile 'hyperpod-p5' (partition dev)",
        ),
        (
            ["--set", "cluster.gpus_per_node=4"],
            "error: cluster.gpus_per_node=4 does not match the 8 GPUs per node of cluster profile 'hyperpod-p5'",
        ),
        (["--set", "cluster.cpus_per_task=32"], "error: cluster.cpus_per_task=32 x 8 processes = 256 CPUs per node"),
        (["--set", "cluster.efa_per_node=32"], "error: cluster.efa_per_node=32 exceeds the 16 EFA interfaces"),
        (["--cluster", "nope"], "error: --cluster 'nope': no cluster profile of that name"),
    ],
)
@pytest.mark.parametrize("command", ["render", "launch"])
def test_misfits_refused_before_submission(command: str, args: list[str], message: str, tmp_path: Path) -> None:
    if "--cluster" not in args:
        args = ["--cluster", "hyperpod-p5", *args]
    out = seis(command, "pretrain", *args, "--runs-dir", str(tmp_path / "runs"))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted


def test_render_with_cluster_from_the_environment(tmp_path: Path) -> None:
    out = seis("render", "pretrain", "--runs-dir", "/fsx/runs", env={"SEIS_CLUSTER": "hyperpod-p5"})
    assert out.returncode == 0, out.stderr
    assert "--auto-resume=1" in out.stdout and "#SBATCH --exclusive" in out.stdout
    eks = seis("render", "pretrain", "--cluster", "hyperpod-p5-eks", "--runs-dir", "/fsx/runs")
    assert eks.returncode == 0, eks.stderr
    assert yaml.safe_load(eks.stdout)["kind"] == "HyperPodPyTorchJob"
    outside = seis("render", "pretrain", "--cluster", "hyperpod-p5-eks", "--runs-dir", str(tmp_path))
    assert outside.returncode == 2 and "outside cluster.shared_dir" in outside.stderr
