"""Rendered job scripts: golden files, shell syntax, and hostile values that must stay inert."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from seiscli.launcher.render import render_script
from seiscli.recipe import RecipeError, load_recipe

GOLDEN = Path(__file__).parent / "golden"
RUN_DIR = Path("/shared/runs/NAME/20261124-120000")
CASES = {
    "smoke.local.sh": ("smoke", {}),
    "smoke.sbatch": ("smoke", {"cluster.backend": "slurm"}),
    "pretrain.sbatch": ("pretrain", {}),
    "pretrain-long-context.sbatch": ("pretrain-long-context", {}),
}


def _render(case: str) -> str:
    name, overrides = CASES[case]
    text = render_script(load_recipe(name, overrides), Path(str(RUN_DIR).replace("NAME", name)))
    return text.replace(sys.executable, "SEIS_PYTHON")  # the local backend runs seis's own interpreter


def bash_n(script: str) -> None:
    out = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = _render(case)
    bash_n(text)
    path = GOLDEN / case
    if os.environ.get("SEIS_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{case} changed; rerun with SEIS_UPDATE_GOLDEN=1 if intended"


def test_local_backend_runs_the_launchers_interpreter() -> None:
    assert f"exec {sys.executable} -m torch.distributed.run" in render_script(load_recipe("smoke"), RUN_DIR)
    chosen = render_script(load_recipe("smoke", {"cluster.python": "/opt/env/bin/python"}), RUN_DIR)
    assert "exec /opt/env/bin/python -m torch.distributed.run" in chosen


def test_sixteen_nodes() -> None:
    text = render_script(load_recipe("pretrain", {"cluster.nodes": 16}), RUN_DIR)
    assert "#SBATCH --nodes=16\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert "#SBATCH --ntasks-per-node=8\n" in text


def _commands(script: str) -> list[str]:
    """The script's commands as bash sees them after parsing (comments and directives dropped)."""
    return [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]


HOSTILE = ["$(touch /tmp/pwned)", "`id`", "a'b\"c", "x\nrm -rf /", "; reboot", "${HOME}"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_env_values_stay_data(value: str, tmp_path: Path) -> None:
    base = load_recipe("pretrain")
    clean = render_script(base, RUN_DIR)
    evil = render_script(load_recipe("pretrain", {"cluster.env.MY_VAR": value}), RUN_DIR)
    bash_n(evil)
    # Exactly one command more (the export), and bash reads back the value unchanged.
    extra = [c for c in _commands(evil) if c not in _commands(clean)]
    joined = "\n".join(extra)
    assert joined.startswith("export MY_VAR=")
    probe = subprocess.run(
        ["bash", "-c", joined + '\nprintf %s "$MY_VAR"'], capture_output=True, text=True, cwd=tmp_path
    )
    assert probe.stdout == value
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [("cluster.partition", "gpu\n#SBATCH --uid=0"), ("cluster.account", "a b"), ("cluster.qos", "$(id)")],
)
def test_hostile_directive_values_refused(field: str, value: str) -> None:
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        render_script(load_recipe("pretrain", {field: value}), RUN_DIR)


def test_hostile_name_refused_before_render() -> None:
    with pytest.raises(RecipeError, match="field 'name'"):
        load_recipe("pretrain", {"name": "$(reboot)"})


def test_hostile_python_and_mounts_quoted() -> None:
    r = load_recipe(
        "pretrain",
        {"cluster.python": "/opt/env/bin/python; rm -rf /", "cluster.container_image": "img $(id)"},
    )
    text = render_script(r, RUN_DIR)
    bash_n(text)
    assert shlex.quote("/opt/env/bin/python; rm -rf /") in text
    assert shlex.quote("img $(id)") in text


@pytest.mark.parametrize("key", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_TOKEN", "DB_PASSWORD"])
def test_credentials_never_rendered(key: str) -> None:
    with pytest.raises(RecipeError, match="credential"):
        render_script(load_recipe("pretrain", {f"cluster.env.{key}": "s3cr3t"}), RUN_DIR)


def test_launch_environment_does_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak-me-not")
    for case in CASES:
        assert "leak-me-not" not in _render(case)
