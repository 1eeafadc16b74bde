"""Cluster profiles: what a cluster is, in one YAML file per cluster, applied to a recipe's `cluster` section.

A recipe says what to train and on how many nodes; a profile says where: scheduler flavor (`type`), partition,
account/QoS, how many nodes the partition has, GPUs/CPUs/EFA per node, container image or Python environment,
shared and node-local filesystems, the S3 region/endpoint, extra sbatch lines, and (EKS) namespace and context.

Where a profile NAME is looked up, first match wins:
  ./clusters/NAME.yaml, then $SEIS_CONFIG_DIR/clusters/ (default $XDG_CONFIG_HOME/seis or ~/.config/seis), then
  the profiles shipped in the repository's clusters/. A path to a YAML file works too.
Which profile applies: --cluster NAME, else $SEIS_CLUSTER, else one named `default` if any, else none.

Precedence, highest first: command line (--nodes, --backend, --set ...) > recipe file > profile > schema
defaults. One exception: a profile's `type` sets cluster.backend even where the recipe file names another
backend (choosing a cluster chooses how to submit to it); --backend or --set cluster.backend still win.
Lists (container_mounts, extra_sbatch) are replaced whole; mappings (env, eks) are merged key by key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seiscli.recipe import PROJECT_ROOT, Recipe, RecipeError, load_yaml, read_recipe_dict, set_path, validate

ProfileType = Literal["slurm", "hyperpod-slurm", "hyperpod-eks"]
SHIPPED_DIR = PROJECT_ROOT / "clusters"
DEFAULT_NAME = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class S3(_Strict):
    region: str | None = None
    endpoint_url: str | None = None


class EksProfile(_Strict):
    namespace: str | None = None
    context: str | None = None
    service_account: str | None = None
    queue: str | None = None
    priority: str | None = None
    shared_pvc: str | None = None
    max_retries: int | None = Field(None, ge=0)


class NcclCheck(_Strict):
    """`seis doctor --nccl`: the all-reduce bus bandwidth a healthy node (pair) of this instance type reaches, and
    how the check runs. Measure the baselines once on known-good nodes (`seis doctor --nccl --json`)."""

    intra_node_busbw_gbps: float | None = Field(None, gt=0)
    inter_node_busbw_gbps: float | None = Field(None, gt=0)
    slow_fraction: float = Field(0.8, gt=0, lt=1, description="below this share of a baseline: slow")
    message_mb: float = Field(256, gt=0)
    iters: int = Field(20, ge=1)
    backend: Literal["nccl", "gloo"] | None = None  # default: nccl on GPU nodes, gloo on CPU ones
    procs_per_node: int = Field(2, ge=1, le=64, description="processes per node where gpus_per_node is 0")
    timeout_s: int = Field(120, ge=5)
    time_limit: str = "00:20:00"


class ClusterProfile(_Strict):
    name: str = ""
    description: str = ""
    type: ProfileType
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(..., ge=1, description="nodes the partition has")
    gpus_per_node: int = Field(..., ge=0, le=64)
    cpus_per_node: int | None = Field(None, ge=1)
    memory_gb: int | None = Field(None, ge=1)
    efa_per_node: int = Field(0, ge=0, le=64)
    instance_type: str | None = None
    container_image: str | None = None
    container_mounts: list[str] | None = None
    python: str | None = None
    shared_dir: str | None = None
    local_dir: str | None = None
    s3: S3 = S3()
    extra_sbatch: list[str] | None = None
    env: dict[str, str] = {}
    eks: EksProfile = EksProfile()
    nccl_check: NcclCheck = NcclCheck()

    def cluster_values(self) -> dict[str, Any]:
        """The recipe `cluster` keys this profile supplies (None = supplies nothing)."""
        values: dict[str, Any] = {
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "gpus_per_node": self.gpus_per_node,
            "instance_type": self.instance_type,
            "efa_per_node": self.efa_per_node or None,
            "container_image": self.container_image,
            "container_mounts": self.container_mounts,
            "python": self.python,
            "shared_dir": self.shared_dir,
            "local_dir": self.local_dir,
            "extra_sbatch": self.extra_sbatch,
        }
        return {k: v for k, v in values.items() if v is not None}


class ProfileError(RecipeError):
    """A profile that cannot be found, read or used; one line, exit 2."""


def config_dir() -> Path:
    if os.environ.get("SEIS_CONFIG_DIR"):
        return Path(os.environ["SEIS_CONFIG_DIR"])
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "seis"


def search_dirs() -> list[Path]:
    return [Path.cwd() / "clusters", config_dir() / "clusters", SHIPPED_DIR]


def list_profiles() -> list[str]:
    return sorted({p.stem for d in search_dirs() if d.is_dir() for p in d.glob("*.yaml")})


def find_profile(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise ProfileError(f"--cluster {name_or_path!r}: no such file")
        return p
    for d in search_dirs():
        cand = d / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    known = ", ".join(list_profiles()) or "none"
    raise ProfileError(f"--cluster {name_or_path!r}: no cluster profile of that name; known: {known}")


def load_profile(name_or_path: str) -> ClusterProfile:
    path = find_profile(name_or_path)
    try:
        data = load_yaml(path.read_text(), str(path))
    except RecipeError as e:
        raise ProfileError(str(e)) from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a cluster profile is a YAML mapping")
    data.setdefault("name", path.stem)
    try:
        return ClusterProfile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        got = first.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise ProfileError(f"{path}: field {loc!r}: {msg}{shown}") from None


def selected_profile(explicit: str | None) -> ClusterProfile | None:
    """--cluster, else $SEIS_CLUSTER, else a profile named `default`, else None."""
    name = explicit or os.environ.get("SEIS_CLUSTER")
    if name:
        return load_profile(name)
    if any((d / f"{DEFAULT_NAME}.yaml").is_file() for d in search_dirs()):
        return load_profile(DEFAULT_NAME)
    return None


def apply_profile(data: dict[str, Any], profile: ClusterProfile) -> dict[str, Any]:
    """Fill a raw recipe mapping from the profile where the recipe file is silent (see module docstring)."""
    cluster = dict(data.get("cluster") or {})
    for key, value in profile.cluster_values().items():
        cluster.setdefault(key, value)
    cluster["backend"] = profile.type
    cluster["profile"] = profile.name
    if "cpus_per_task" not in cluster and profile.cpus_per_node and cluster.get("gpus_per_node"):
        cluster["cpus_per_task"] = profile.cpus_per_node // int(cluster["gpus_per_node"])
    cluster["env"] = profile.env | dict(cluster.get("env") or {})
    eks = {k: v for k, v in profile.eks.model_dump().items() if v is not None}
    cluster["eks"] = eks | dict(cluster.get("eks") or {})
    data = dict(data) | {"cluster": cluster}
    data_section = dict(data.get("data") or {})
    if profile.s3.region:
        data_section.setdefault("region", profile.s3.region)
    if profile.s3.endpoint_url:
        data_section.setdefault("endpoint_url", profile.s3.endpoint_url)
    if data_section:
        data["data"] = data_section
    return data


def check_fit(recipe: Recipe, profile: ClusterProfile) -> None:
    """Refuse, before anything is written, a recipe this cluster cannot run."""
    c = recipe.cluster
    if c.backend == "local":
        return  # the local backend sizes the job to this machine itself
    where = f"cluster profile {profile.name!r}" + (f" (partition {profile.partition})" if profile.partition else "")
    if c.nodes > profile.nodes:
        raise ProfileError(f"cluster.nodes={c.nodes} exceeds the {profile.nodes} nodes of {where}")
    if c.gpus_per_node and c.gpus_per_node != profile.gpus_per_node:
        raise ProfileError(
            f"cluster.gpus_per_node={c.gpus_per_node} does not match the {profile.gpus_per_node} GPUs per node of "
            f"{where}; allowed: {profile.gpus_per_node}, or 0 for CPU processes"
        )
    cpus = c.procs_per_node * (c.cpus_per_task or 1)
    if profile.cpus_per_node and cpus > profile.cpus_per_node:
        raise ProfileError(
            f"cluster.cpus_per_task={c.cpus_per_task} x {c.procs_per_node} processes = {cpus} CPUs per node exceeds "
            f"the {profile.cpus_per_node} of {where}"
        )
    if c.efa_per_node > profile.efa_per_node:
        raise ProfileError(
            f"cluster.efa_per_node={c.efa_per_node} exceeds the {profile.efa_per_node} EFA interfaces per node "
            f"of {where}"
        )


def load_recipe_for_cluster(
    name_or_path: str, overrides: dict[str, Any] | None = None, cluster: str | None = None
) -> Recipe:
    """`load_recipe` with a cluster profile between the recipe file and the command-line overrides."""
    profile = selected_profile(cluster)
    data = read_recipe_dict(name_or_path)
    if profile is not None:
        data = apply_profile(data, profile)
    for key, value in (overrides or {}).items():
        set_path(data, key, value)
    recipe = validate(data)
    if profile is not None:
        check_fit(recipe, profile)
    return recipe
