"""Render job scripts from `templates/` with the resolved recipe.

Every user-supplied value reaches a shell through the one `q` filter (shlex.quote), and values that
land on `#SBATCH` lines (parsed by sbatch, not by a shell) must be plain tokens: both are checked here,
so a hostile recipe can neither add commands nor add directives.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

import jinja2
import yaml

from seiscli import __version__
from seiscli.recipe import PROJECT_ROOT, Recipe, RecipeError
from seiscli.run_layout import EXIT_COMM, NEVER_RETRY, RETRY_CODES

TEMPLATES_DIR = PROJECT_ROOT / "templates"

# Which template renders the job for each backend.
TEMPLATE_FOR_BACKEND = {
    "local": "local.sh.j2",
    "slurm": "slurm.sbatch.j2",
    "hyperpod-slurm": "slurm.sbatch.j2",
    "hyperpod-eks": "hyperpod-eks.yaml.j2",  # a HyperPodPyTorchJob manifest, not a script
}

# Environment names that would put a secret into a file others can read; credentials come from the
# nodes' own AWS chain (instance profile, ~/.aws), never from the job script.
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY)", re.I)
_DIRECTIVE_VALUE = re.compile(r"[A-Za-z0-9._,:+@%=/\[\]-]+")


def shell_quote(value: Any) -> str:
    return shlex.quote(str(value))


def directive(value: Any, field: str) -> str:
    """A value for an `#SBATCH` line: sbatch splits these itself, so allow plain tokens only."""
    text = str(value)
    if not _DIRECTIVE_VALUE.fullmatch(text):
        raise RecipeError(
            f"field {field!r}: {text!r} cannot go on an #SBATCH line; use letters, digits and ._,:+@%=/[]-"
        )
    return text


def yaml_quote(value: Any) -> str:
    """A YAML double-quoted scalar that reads back as exactly this string: manifests get values only through it."""
    text = yaml.safe_dump(str(value), default_style='"', allow_unicode=False, width=1 << 30)
    return text.removesuffix("\n")


def check_no_secrets(recipe: Recipe) -> None:
    for key in recipe.cluster.env:
        if _SECRET_NAME.search(key):
            raise RecipeError(
                f"field 'cluster.env.{key}': looks like a credential; job scripts never carry credentials "
                "(the nodes use their own AWS credential chain: instance profile or ~/.aws)"
            )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # shell scripts, not HTML: quoting is done by `q` explicitly
    )
    env.filters["q"] = shell_quote
    env.filters["directive"] = directive
    env.filters["yq"] = yaml_quote
    return env


def render_script(recipe: Recipe, run_dir: Path, *, template: str | None = None) -> str:
    """The job script for `recipe`, writing into `run_dir` (which need not exist yet)."""
    check_no_secrets(recipe)
    name = template or TEMPLATE_FOR_BACKEND.get(recipe.cluster.backend)
    if name is None:
        raise RecipeError(
            f"field 'cluster.backend': {recipe.cluster.backend!r} renders no shell script; "
            f"script backends: {', '.join(TEMPLATE_FOR_BACKEND)}"
        )
    if re.search(r"\s", str(run_dir)):
        raise RecipeError(f"run directory {str(run_dir)!r} contains white space, which #SBATCH paths cannot hold")
    c = recipe.cluster
    extra: dict[str, Any] = {}
    if c.backend == "local":
        # The "node" is this machine: the default `python3` means the interpreter seis itself runs under
        # (a virtual environment that is not activated included), not whichever python3 PATH finds first.
        extra["python"] = sys.executable if c.python == "python3" else c.python
    if c.backend == "hyperpod-eks":
        from seiscli.launcher.backends.hyperpod_eks import manifest_context

        extra = manifest_context(recipe, run_dir)
    return (
        _environment()
        .get_template(name)
        .render(
            recipe=recipe,
            c=c,
            run_dir=str(run_dir),
            recipe_path=str(run_dir / "recipe.yaml"),
            logs_dir=str(run_dir / "logs"),
            version=__version__,
            retry_codes=RETRY_CODES,
            never_retry=NEVER_RETRY,
            exit_comm=EXIT_COMM,
            **extra,
        )
    )


def render_template(template: str, **context: Any) -> str:
    """Any template of templates/ with the same filters (`q`, `directive`, `yq`), e.g. the sweep's job script."""
    return _environment().get_template(template).render(version=__version__, **context)
