"""HyperPod job files: golden sbatch scripts (Slurm flavor) and HyperPodPyTorchJob manifests (EKS flavor),
validated against AWS's own models; hostile values stay data in both."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from seiscli.launcher.backends.hyperpod_eks import GROUP, KIND, VERSION, job_name
from seiscli.launcher.profiles import load_recipe_for_cluster
from seiscli.launcher.render import render_script
from seiscli.recipe import PROJECT_ROOT, RecipeError

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = "/fsx/runs/NAME/20261124-120000"
P5 = str(PROJECT_ROOT / "clusters" / "hyperpod-p5.yaml")
P5_EKS = str(PROJECT_ROOT / "clusters" / "hyperpod-p5-eks.yaml")
VENV = {"cluster.container_image": None, "cluster.python": "/fsx/envs/seis/bin/python"}
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "pretrain.hyperpod.sbatch": ("pretrain", P5, {}),
    "pretrain-long-context.hyperpod.sbatch": ("pretrain-long-context", P5, {}),
    "pretrain.hyperpod-venv.sbatch": ("pretrain", P5, VENV),
    "pretrain.eks.yaml": ("pretrain", P5_EKS, {}),
    "pretrain-long-context.eks.yaml": ("pretrain-long-context", P5_EKS, {}),
}


def _render(recipe: str, profile: str, overrides: dict[str, Any]) -> str:
    r = load_recipe_for_cluster(recipe, overrides, profile)
    return render_script(r, Path(RUN_DIR.replace("NAME", r.name)))


def bash_n(script: str) -> None:
    out = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr


# -- AWS's models ------------------------------------------------------------------------------------------


def aws_models() -> ModuleType:
    """sagemaker-hyperpod's pydantic models of the HyperPodPyTorchJob CRD, loaded from their file: the package's
    __init__ pulls kubernetes, awscli and more, the models themselves need pydantic only. `make install` puts the
    package in <env>/aws-models, outside site-packages, so its pins never make the environment inconsistent."""
    found = list(
        importlib.metadata.distributions(name="sagemaker-hyperpod", path=[str(Path(sys.prefix, "aws-models"))])
    )
    if not found:
        pytest.fail(
            f'AWS models missing: pip install --no-deps --target {sys.prefix}/aws-models "sagemaker-hyperpod==3.12.0"'
            " (make install does)"
        )
    dist = found[0]
    path = Path(str(dist.locate_file("sagemaker/hyperpod/training/config/hyperpod_pytorch_job_unified_config.py")))
    spec = importlib.util.spec_from_file_location("hyperpod_pytorch_job_unified_config", path)
    assert spec and spec.loader, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validate_manifest(manifest: dict[str, Any]) -> None:
    """As the SDK reads a job back from the API server (sagemaker.hyperpod.training.hyperpod_pytorch_job._load_hp_job):
    spec through _HyperPodPytorchJob by field name. Its top level ignores unknown keys, so the spec must also
    survive a round trip unchanged; every nested model forbids extras."""
    models = aws_models()
    assert manifest["apiVersion"] == f"{GROUP}/{VERSION}" and manifest["kind"] == KIND
    assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
    models.Metadata.model_validate(
        {k: v for k, v in manifest["metadata"].items() if k != "namespace"} | {"namespace": "x"}, by_name=True
    )
    job = models._HyperPodPytorchJob.model_validate(manifest["spec"], by_name=True)
    assert job.model_dump(exclude_unset=True, by_alias=False) == manifest["spec"]


# -- goldens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = _render(*CASES[case])
    if case.endswith(".sbatch"):
        bash_n(text)
    else:
        validate_manifest(yaml.safe_load(text))
    path = GOLDEN / case
    if os.environ.get("SEIS_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{case} changed; rerun with SEIS_UPDATE_GOLDEN=1 if intended"


def test_hyperpod_sbatch_has_the_p5_essentials() -> None:
    text = _render("pretrain", P5, {})
    for line in (
        "export FI_PROVIDER=efa",
        "export FI_EFA_USE_DEVICE_RDMA=1",
        "export NCCL_SOCKET_IFNAME=^docker,lo,veth",
        "#SBATCH --exclusive",
        "export SEIS_SHARED_DIR=/fsx",
        "export SEIS_LOCAL_DIR=/opt/dlami/nvme",
        "  auto_resume=(--auto-resume=1)",
        "  --container-image=/fsx/images/seis.sqsh \\",
        "  --container-mounts=/fsx:/fsx,/opt/dlami/nvme:/opt/dlami/nvme \\",
    ):
        assert any(x.split("  # ")[0] == line for x in text.splitlines()), line
    assert 'srun "${auto_resume[@]}" --kill-on-bad-exit=1' in text
    assert "LD_LIBRARY_PATH" not in text  # the image's own libraries stay visible
    venv = _render("pretrain", P5, VENV)
    assert "/opt/amazon/ofi-nccl/lib" in venv and "--container-image" not in venv
    off = _render("pretrain", P5, {"cluster.auto_resume": False})
    assert "--auto-resume" not in off and "auto_resume" not in off


def test_user_env_overrides_the_efa_defaults() -> None:
    text = _render("pretrain", P5, {"cluster.env.NCCL_SOCKET_IFNAME": "ens"})
    lines = [x.split("  # ")[0] for x in text.splitlines()]
    assert lines.index("export NCCL_SOCKET_IFNAME=ens") > lines.index("export NCCL_SOCKET_IFNAME=^docker,lo,veth")


def test_rendezvous_follows_the_step_node_list() -> None:
    """The wrapper each task runs: MASTER_ADDR from its own step's node list (after a node replacement the batch
    script's environment is stale); bash only, as inside a container."""
    text = _render("pretrain", P5, {})
    (line,) = [x for x in text.splitlines() if x.startswith("rendezvous_on_rank0=")]
    cases = {
        "ip-10-1-2-[4-5]": "ip-10-1-2-4",
        "node1,node[3-4]": "node1",
        "gpu-[007-009]x": "gpu-007x",
        "ip-10-1-[63,70]-235": "ip-10-1-63-235",
        "": "stale",
    }
    for nodelist, want in cases.items():
        probe = subprocess.run(
            ["bash", "-c", f'{line}\nbash -c "$rendezvous_on_rank0" task bash -c \'printf %s "$MASTER_ADDR"\''],
            env={"PATH": os.environ["PATH"], "MASTER_ADDR": "stale", "SLURM_STEP_NODELIST": nodelist},
            capture_output=True,
            text=True,
        )
        assert probe.stdout == want, (nodelist, probe.stderr)


# -- EKS manifests -----------------------------------------------------------------------------------------


def test_manifest_requests_gpus_and_efa_and_runs_the_trainer() -> None:
    m = yaml.safe_load(_render("pretrain", P5_EKS, {}))
    (replica,) = m["spec"]["replicaSpecs"]
    assert replica["replicas"] == 16 and m["spec"]["nprocPerNode"] == "8"
    (container,) = replica["template"]["spec"]["containers"]
    for kind in ("requests", "limits"):
        assert container["resources"][kind] == {"nvidia.com/gpu": 8, "vpc.amazonaws.com/efa": 16}
    cmd = container["command"]
    assert cmd[:3] == ["hyperpodrun", "--nnodes=16", "--nproc-per-node=8"]
    assert cmd[-5:] == [
        "-m",
        "seiscli.train",
        "/fsx/runs/pretrain/20261124-120000/recipe.yaml",
        "--run-dir",
        "/fsx/runs/pretrain/20261124-120000",
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FI_PROVIDER"] == "efa" and env["OMP_NUM_THREADS"] == "24"
    assert m["spec"]["runPolicy"]["jobMaxRetryCount"] == 10


def test_the_validator_can_fail() -> None:
    m = yaml.safe_load(_render("pretrain", P5_EKS, {}))
    m["spec"]["replicaSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}  # misspelt
    with pytest.raises(ValueError, match="resource"):
        validate_manifest(m)
    m = yaml.safe_load(_render("pretrain", P5_EKS, {}))
    m["spec"]["runPolicys"] = {}  # the lenient top level: caught by the round trip
    with pytest.raises(AssertionError):
        validate_manifest(m)


HOSTILE = ["x\nkind: Secret", '"; rm -rf / #', "{{ evil }}", "- a\n- b", "a: b", "'q'", "\\", "\x85\u2028", "é€ 😀"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_stay_data_in_manifests(value: str) -> None:
    clean = yaml.safe_load(_render("pretrain", P5_EKS, {}))
    hostile = {
        "cluster.env.MY_VAR": value,
        "cluster.container_image": value,
        "cluster.eks.queue": value,
        "cluster.eks.service_account": value,
        "cluster.instance_type": value,
    }
    m = yaml.safe_load(_render("pretrain", P5_EKS, hostile))
    pod = m["spec"]["replicaSpecs"][0]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == value
    assert container["env"][-1] == {"name": "MY_VAR", "value": value}
    assert pod["spec"]["serviceAccountName"] == value
    assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == value
    assert pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"][1]["values"] == [value]
    # Nothing else moved: same keys everywhere, one env entry more.
    assert set(m) == set(clean) and set(m["spec"]) == set(clean["spec"])
    clean_env = clean["spec"]["replicaSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    assert len(container["env"]) == len(clean_env) + 1
    validate_manifest(m)


def test_hostile_run_dir_stays_data(tmp_path: Path) -> None:
    r = load_recipe_for_cluster("pretrain", {"cluster.shared_dir": "/fsx"}, P5_EKS)
    odd = Path("/fsx/runs/a\"b'c:#{d}/20261124-120000")
    m = yaml.safe_load(render_script(r, odd))
    assert m["spec"]["replicaSpecs"][0]["template"]["spec"]["containers"][0]["command"][-1] == str(odd)


def test_job_names_are_dns_labels() -> None:
    for name in ("pretrain", "Pretrain_Long.Context", "x" * 128, "a-"):
        n = job_name(name, Path("/fsx/runs/x/20261124-120000-2"))
        assert len(n) <= 52 and n.endswith("20261124-120000-2")
        assert n == n.lower() and n[0].isalnum() and n[-1].isalnum()
        assert all(ch.isalnum() or ch == "-" for ch in n)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"cluster.container_image": None}, "cluster.container_image"),
        ({"cluster.eks.shared_pvc": None}, "shared_pvc"),
    ],
)
def test_manifests_that_could_not_start_are_refused(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        _render("pretrain", P5_EKS, overrides)


def test_run_dir_outside_the_shared_filesystem_is_refused() -> None:
    r = load_recipe_for_cluster("pretrain", {}, P5_EKS)
    with pytest.raises(RecipeError, match=r"outside cluster\.shared_dir '/fsx'"):
        render_script(r, Path("/home/me/runs/pretrain/20261124-120000"))
