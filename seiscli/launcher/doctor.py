"""`seis doctor`: pre-flight checks on the login node, before a job asks for 128 GPUs.

Each check is one row: pass, warn (cannot be verified from here, or works but is not as it should be) or fail
(the job would not run), with the fix. Nothing is faked: a check whose tool is absent here says so as a warning.
Heavy imports (zarr through seiscli.data, boto3, kubernetes) happen inside the checks that need them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from seiscli.recipe import Recipe, RecipeError

Status = Literal["pass", "warn", "fail"]
TIMEOUT_S = 20.0
MAX_VOLUMES = 8  # opened for a shape check; a glob over hundreds of volumes is sampled


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _run(cmd: list[str]) -> tuple[int, str]:
    """Exit code and output (stderr folded in); 127 when the tool is not installed."""
    if shutil.which(cmd[0]) is None:
        return 127, f"{cmd[0]}: not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(cmd)}: no answer in {TIMEOUT_S:.0f} s"
    return out.returncode, (out.stdout + out.stderr).strip()


# -- Slurm -------------------------------------------------------------------------------------------------


@dataclass
class SlurmNode:
    name: str
    state: str
    gpus: int


def _gpus_from_gres(gres: str) -> int:
    """`gpu:8`, `gpu:h200:8(S:0-1)`, `gpu:a:4,gpu:b:4` -> GPUs; `(null)` -> 0."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def slurm_nodes(partition: str | None) -> tuple[list[SlurmNode] | None, str]:
    cmd = ["sinfo", "-h", "-N", "-o", "%N|%T|%G"] + (["-p", partition] if partition else [])
    code, text = _run(cmd)
    if code != 0:
        return None, text.splitlines()[-1] if text else f"sinfo exited {code}"
    nodes = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            nodes[parts[0]] = SlurmNode(parts[0], parts[1].rstrip("*~#!%$@^-"), _gpus_from_gres(parts[2]))
    return list(nodes.values()), ""


def default_partition() -> str | None:
    code, text = _run(["sinfo", "-h", "-o", "%P"])
    if code != 0:
        return None
    return next((p.rstrip("*") for p in text.split() if p.endswith("*")), None)


def check_slurm(recipe: Recipe) -> list[Check]:
    c = recipe.cluster
    code, text = _run(["scontrol", "ping"])
    if code != 0 or " is UP" not in text:
        return [
            Check(
                "slurm",
                "fail",
                f"slurmctld does not answer: {text.splitlines()[-1] if text else code}",
                "run on the cluster's login node (or start a test cluster: bash scripts/local-slurm.sh up)",
            )
        ]
    rows = [Check("slurm", "pass", text.splitlines()[0].strip())]
    partition = c.partition or default_partition()
    nodes, error = slurm_nodes(partition)
    if not nodes:
        _, names = _run(["sinfo", "-h", "-o", "%P"])
        rows.append(
            Check(
                "partition",
                "fail",
                f"partition {partition!r}: {error or 'not found'}; here: {', '.join(names.split()) or 'none'}",
                "set cluster.partition (or the profile's partition) to one of those",
            )
        )
        return rows
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.state] = counts.get(n.state, 0) + 1
    usable = sum(v for k, v in counts.items() if k in ("idle", "mixed", "allocated", "completing"))
    idle = counts.get("idle", 0)
    states = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    detail = f"partition {partition}: {len(nodes)} nodes ({states}); the job needs {c.nodes}"
    if len(nodes) < c.nodes:
        rows.append(Check("partition", "fail", detail, f"use at most --nodes {len(nodes)}"))
    elif usable < c.nodes:
        down = [n.name for n in nodes if n.state not in ("idle", "mixed", "allocated", "completing")]
        rows.append(
            Check(
                "partition",
                "fail",
                detail,
                f"too many nodes drained/down ({', '.join(down[:8])}{' ...' if len(down) > 8 else ''}): "
                f"`sinfo -R` says why; on HyperPod, replace them (scontrol update node=N state=fail reason=...)",
            )
        )
    elif idle < c.nodes:
        rows.append(Check("partition", "warn", detail, "the job will wait for busy nodes; `squeue -p` shows who"))
    else:
        rows.append(Check("partition", "pass", detail))
    gpus = sorted({n.gpus for n in nodes})
    if c.gpus_per_node == 0:
        rows.append(Check("gpus", "pass", f"CPU processes ({c.cpu_procs_per_node} per node); GPUs per node: {gpus}"))
    elif gpus == [c.gpus_per_node]:
        rows.append(Check("gpus", "pass", f"{c.gpus_per_node} GPUs per node (gres)"))
    else:
        rows.append(
            Check(
                "gpus",
                "fail",
                f"the job wants {c.gpus_per_node} GPUs per node; partition {partition} nodes have {gpus} (gres)",
                "set cluster.gpus_per_node to what the nodes have, or ask the admins to configure gres=gpu",
            )
        )
    return rows


def check_pyxis(recipe: Recipe) -> Check | None:
    if not recipe.cluster.container_image:
        return None
    code, text = _run(["srun", "--help"])
    if code != 0:
        return Check("pyxis", "warn", f"srun --help: {text.splitlines()[-1] if text else code}", "")
    if "--container-image" in text:
        return Check("pyxis", "pass", "srun knows --container-image (pyxis plugin loaded)")
    return Check(
        "pyxis",
        "fail",
        "srun has no --container-image: the pyxis plugin is not loaded",
        "install enroot + pyxis (HyperPod lifecycle scripts: utils/install_enroot_pyxis.sh) or unset "
        "cluster.container_image and use a Python environment on the shared filesystem (cluster.python)",
    )


# -- node hardware -------------------------------------------------------------------------------------------


def check_efa(recipe: Recipe) -> Check:
    needed = recipe.cluster.backend in ("hyperpod-slurm", "hyperpod-eks") and recipe.cluster.gpus_per_node > 0
    exe = shutil.which("fi_info") or shutil.which("/opt/amazon/efa/bin/fi_info")
    if exe is None:
        where = f" -p {recipe.cluster.partition}" if recipe.cluster.partition else ""
        return Check(
            "efa",
            "warn",
            "fi_info not found here: EFA cannot be checked from this machine",
            f"check a compute node: srun -N1{where} /opt/amazon/efa/bin/fi_info -p efa" if needed else "",
        )
    code, text = _run([exe, "-p", "efa"])
    if code == 0 and "provider: efa" in text:
        devices = len(re.findall(r"domain: \S+-rdm", text))
        return Check("efa", "pass", f"libfabric efa provider present ({devices} RDM domain(s))")
    return Check(
        "efa",
        "fail" if needed else "warn",
        "fi_info -p efa finds no EFA device",
        "use an EFA-enabled instance (P5) with the EFA driver; HyperPod AMIs ship it" if needed else "",
    )


def check_hyperpod(recipe: Recipe) -> Check | None:
    if recipe.cluster.backend != "hyperpod-slurm":
        return None
    if Path("/opt/sagemaker_cluster").is_dir():
        return Check("hyperpod", "pass", "HyperPod node (/opt/sagemaker_cluster): srun --auto-resume=1 is available")
    return Check(
        "hyperpod",
        "warn",
        "not a HyperPod node (no /opt/sagemaker_cluster): the job will run without auto-resume",
        "run seis doctor on the HyperPod login/head node; elsewhere use cluster.backend=slurm",
    )


# -- storage -------------------------------------------------------------------------------------------------


def check_data(recipe: Recipe) -> list[Check]:
    d = recipe.data
    if d.source == "synthetic":
        return [Check("data", "pass", f"synthetic volume {d.synth_shape}, generated on the nodes")]
    try:
        from seiscli.data.store import expand, storage_options_for
        from seiscli.data.volume import VolumeError, open_volume
    except ImportError as e:
        return [Check("data", "warn", f"cannot open volumes here ({e.name} missing)", "pip install 'seis[train]'")]
    opts = storage_options_for(d.uris[0], endpoint_url=d.endpoint_url, region=d.region)
    try:
        uris = expand(d.uris, opts)
    except Exception as e:  # no match, no credentials, no bucket: one line each
        return [Check("data", "fail", f"data.uris: {_one_line(e)}", "check the URIs and the credentials/region")]
    rows = []
    for uri in uris[:MAX_VOLUMES]:
        try:
            v = open_volume(uri, endpoint_url=d.endpoint_url, region=d.region)
        except (VolumeError, OSError, ValueError) as e:
            rows.append(Check("data", "fail", _one_line(e), "is it an MDIO v1 dataset? `seis data inspect URI`"))
            continue
        small = [f"{s} < {c}" for s, c in zip(v.shape, d.crop, strict=True) if s < c]
        big = [f"{ch} > {c}" for ch, c in zip(v.chunks, d.crop, strict=True) if ch > c]
        detail = f"{uri}: shape {v.shape}, chunks {v.chunks}, {v.dtype}"
        if small:
            rows.append(
                Check("data", "fail", f"{detail}; smaller than the crop ({', '.join(small)})", "reduce data.crop")
            )
        elif big:
            rows.append(
                Check(
                    "data",
                    "warn",
                    f"{detail}; chunks larger than the crop ({', '.join(big)}) read more than a sample needs",
                    "rechunk the volume (128^3 is a good default)",
                )
            )
        else:
            rows.append(Check("data", "pass", detail))
    if len(uris) > MAX_VOLUMES:
        rows.append(Check("data", "pass", f"{len(uris)} volumes match data.uris; checked the first {MAX_VOLUMES}"))
    return rows


def check_checkpoint(recipe: Recipe, runs_root: Path) -> Check:
    """A probe file written and removed where the checkpoints will go (the schema allows only filesystems)."""
    target = recipe.checkpoint.dir or str(runs_root / recipe.name / "<timestamp>" / "checkpoints")
    probe = f".seis-doctor-{uuid.uuid4().hex[:8]}"
    base = Path(target) if recipe.checkpoint.dir else runs_root
    existing = next((p for p in [base, *base.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        return Check("checkpoint", "fail", f"{target}: no existing parent directory", "create it")
    try:
        tmp = existing / probe
        tmp.write_bytes(b"seis doctor")
        tmp.unlink()
    except OSError as e:
        return Check("checkpoint", "fail", f"{target}: cannot write in {existing}: {e.strerror}", "fix permissions")
    shared = recipe.cluster.shared_dir
    if shared and not Path(target).is_relative_to(shared):
        return Check(
            "checkpoint",
            "warn",
            f"{target}: writable here, but outside the shared filesystem {shared}",
            f"other nodes cannot read it: use --runs-dir {shared}/... or checkpoint.dir on {shared}",
        )
    return Check("checkpoint", "pass", f"{target}: writable (checked {existing})")


def check_image(recipe: Recipe) -> Check:
    c = recipe.cluster
    image = c.container_image
    if image is None:
        exe = shutil.which(c.python)  # a name on PATH, or an absolute path
        if exe is None:
            return Check(
                "image",
                "fail" if os.path.isabs(c.python) else "warn",
                f"no container image; Python {c.python!r} not found here",
                "set cluster.python to an environment on the shared filesystem, or cluster.container_image",
            )
        return Check("image", "pass", f"no container image; Python environment {exe}")
    if image.startswith(("/", "./")) or image.endswith(".sqsh"):
        p = Path(image)
        if p.is_file() and os.access(p, os.R_OK):
            return Check("image", "pass", f"enroot image {image} ({p.stat().st_size / 2**30:.1f} GiB)")
        return Check(
            "image",
            "fail",
            f"enroot image {image}: not found",
            f"enroot import -o {image} docker://<registry>/<image>:<tag>  (on the shared filesystem)",
        )
    if c.backend == "hyperpod-eks":
        return Check("image", "pass", f"registry image {image} (pulled by the nodes; not checked from here)")
    return Check(
        "image",
        "warn",
        f"registry image {image}: every node pulls it through pyxis at job start",
        "import it once to a squashfs on the shared filesystem: enroot import -o /fsx/images/NAME.sqsh docker://...",
    )


def check_shared(recipe: Recipe, runs_root: Path) -> Check | None:
    shared = recipe.cluster.shared_dir
    if not shared:
        return None
    if not Path(shared).is_dir():
        return Check("shared_dir", "fail", f"{shared}: not mounted here", "mount the shared filesystem (FSx) first")
    if not runs_root.is_relative_to(shared):
        return Check(
            "shared_dir",
            "fail" if recipe.cluster.backend == "hyperpod-eks" else "warn",
            f"runs go to {runs_root}, outside {shared}: the nodes will not see the run directory",
            f"export SEIS_RUNS_DIR={shared}/$USER/seis-runs (or --runs-dir)",
        )
    return Check("shared_dir", "pass", f"{shared} mounted; runs under {runs_root}")


def check_kubernetes(recipe: Recipe) -> list[Check]:
    from seiscli.launcher.backends.base import SubmitError
    from seiscli.launcher.backends.hyperpod_eks import GROUP, VERSION, _kube

    try:
        client, api = _kube(recipe.cluster.eks.context)
    except SubmitError as e:
        return [Check("kubernetes", "fail", str(e), "aws eks update-kubeconfig --name <EKS cluster>")]
    try:
        client.CustomObjectsApi(api).list_namespaced_custom_object(
            GROUP, VERSION, recipe.cluster.eks.namespace, "hyperpodpytorchjobs", limit=1
        )
    except client.ApiException as e:
        fix = "install the HyperPod training operator (EKS add-on)" if e.status == 404 else "check RBAC"
        return [Check("kubernetes", "fail", f"HyperPodPyTorchJob API: {e.status} {e.reason}", fix)]
    except Exception as e:  # not reachable
        return [Check("kubernetes", "fail", f"Kubernetes API not reached: {_one_line(e)}", "check VPN/endpoint")]
    return [Check("kubernetes", "pass", f"HyperPodPyTorchJob API answers in namespace {recipe.cluster.eks.namespace}")]


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- all of it -----------------------------------------------------------------------------------------------


def run_checks(load: Callable[[], Recipe], runs_root: Path) -> list[Check]:
    """`load` resolves the recipe with the cluster profile; its refusal is the first failed row."""
    try:
        recipe = load()
    except RecipeError as e:
        return [Check("recipe", "fail", str(e), "fix the recipe, the overrides or --cluster")]
    c = recipe.cluster
    where = f" on profile {c.profile}" if c.profile else ""
    rows = [
        Check(
            "recipe",
            "pass",
            f"{recipe.name}{where}: {c.backend}, {c.nodes} node(s) x {c.procs_per_node}, {recipe.num_tokens:,} tokens",
        )
    ]
    if c.backend in ("slurm", "hyperpod-slurm"):
        rows += check_slurm(recipe)
        rows += [r for r in (check_hyperpod(recipe), check_pyxis(recipe)) if r is not None]
    elif c.backend == "hyperpod-eks":
        rows += check_kubernetes(recipe)
    rows.append(check_efa(recipe))
    shared = check_shared(recipe, runs_root)
    if shared is not None:
        rows.append(shared)
    rows.append(check_image(recipe))
    rows += check_data(recipe)
    rows.append(check_checkpoint(recipe, runs_root))
    return rows
