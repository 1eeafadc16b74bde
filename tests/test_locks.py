"""The locks (`make lock`) pin every requirement pyproject.toml declares, at versions its specifiers admit: a
dependency added or re-ranged without refreshing the locks fails here, not on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from seiscli.recipe import PROJECT_ROOT

PYPROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
LOCKED_EXTRAS = {"dev.txt": ("train", "dev"), "train.txt": ("train", "viewers")}  # as the Makefile's lock target
UNLOCKED = {"torch"}  # installed on its own (build/lock-excludes.txt): CPU build here, the node's CUDA build there


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, _, version = line.split(";")[0].strip().partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _requirements(extras: tuple[str, ...]) -> list[Requirement]:
    out, todo, seen = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]], list(extras), set()
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for r in map(Requirement, EXTRAS[extra]):
            if canonicalize_name(r.name) == canonicalize_name(PYPROJECT["project"]["name"]):
                todo += [e for e in r.extras if e not in seen]  # a self-reference, e.g. seis[viewers]
            else:
                out.append(r)
    return out


@pytest.mark.parametrize("lock", sorted(LOCKED_EXTRAS))
def test_every_declared_requirement_is_pinned_within_its_range(lock: str) -> None:
    pins = _pins(PROJECT_ROOT / "locks" / lock)
    for req in _requirements(LOCKED_EXTRAS[lock]):
        name = canonicalize_name(req.name)
        if name in UNLOCKED or (req.marker and not req.marker.evaluate({"python_version": "3.11"})):
            continue
        assert name in pins, f"{req.name} is declared but not in locks/{lock}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"locks/{lock} pins {req.name}=={pins[name]}, outside {req.specifier}: run `make lock`"
        )
    assert not UNLOCKED & pins.keys()
