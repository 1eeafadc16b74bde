"""Launch-side provenance (layout in seiscli/run_layout.py): the code the job will run, as git knows it, and
the container image. Written by `seis launch` into provenance/ of the new run directory.

A dirty tree does not stop a launch: its uncommitted changes (tracked files, and untracked files git does not
ignore) are written to provenance/git.patch, so `git checkout <commit> && git apply git.patch` gives back the
code that ran. Refusing dirty trees would push people to throwaway commits or to a habitual --allow-dirty,
and either way the exact code is no better recorded than by the patch.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from seiscli import __version__
from seiscli.recipe import PROJECT_ROOT, Recipe
from seiscli.run_layout import FORMAT, GIT_PATCH, LAUNCH_PROVENANCE, provenance_dir

MAX_UNTRACKED_BYTES = 4 << 20  # larger untracked files are listed, not copied into the patch


def _git(root: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """commit, branch, dirty, the patch (bytes, under "patch") and what was left out of it."""
    head = _git(root, "rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return {"repo": str(root), "commit": None, "note": "not a git checkout (an installed package?)"}
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    tracked = _git(root, "diff", "HEAD", "--binary")
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z")
    patch = tracked.stdout if tracked is not None and tracked.returncode == 0 else b""
    skipped: list[str] = []
    for name in untracked.stdout.decode(errors="replace").split("\0") if untracked else []:
        if not name:
            continue
        path = root / name
        if not path.is_file() or path.stat().st_size > MAX_UNTRACKED_BYTES:
            skipped.append(name)
            continue
        # `git diff --no-index` exits 1 when the files differ, which they always do here.
        new = _git(root, "diff", "--no-index", "--binary", "--", "/dev/null", name)
        if new is not None and new.returncode in (0, 1):
            patch += new.stdout
    return {
        "repo": str(root),
        "commit": head.stdout.decode().strip(),
        "branch": branch.stdout.decode().strip() if branch and branch.returncode == 0 else None,
        "dirty": bool(patch) or bool(skipped),
        "patch": patch,
        "untracked_not_in_patch": skipped,
    }


def image_reference(image: str | None) -> dict[str, Any] | None:
    """The container image and its digest: from a pinned reference (`repo@sha256:...`); for a local squashfs
    file, its size and mtime (hashing gigabytes on a login node at every launch is not worth it)."""
    if not image:
        return None
    ref: dict[str, Any] = {"image": image, "digest": None}
    if "@sha256:" in image:
        ref["digest"] = "sha256:" + image.split("@sha256:", 1)[1]
    elif os.path.isfile(image):
        st = os.stat(image)
        ref |= {"file_size": st.st_size, "file_mtime": st.st_mtime, "note": "local image file; not hashed"}
        if st.st_size <= 64 << 20:  # small files (tests, tiny images) are cheap to hash
            ref["digest"] = "sha256:" + hashlib.sha256(Path(image).read_bytes()).hexdigest()
    else:
        ref["note"] = "tag, not pinned: pin `image@sha256:...` to record the exact image"
    return ref


def write_launch_provenance(run_path: Path, recipe: Recipe, *, root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """provenance/launch.json (and git.patch when the tree is dirty); returns what launch.json holds."""
    out = provenance_dir(run_path)
    out.mkdir(exist_ok=True)
    git = git_state(root)
    patch = git.pop("patch", b"")
    if patch:
        (out / GIT_PATCH).write_bytes(patch)
        git["patch_file"] = f"{out.name}/{GIT_PATCH}"
        git["patch_bytes"] = len(patch)
    data = {
        "format": FORMAT,
        "time": time.time(),
        "seis_version": __version__,
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "git": git,
        "container": image_reference(recipe.cluster.container_image),
    }
    (out / LAUNCH_PROVENANCE).write_text(json.dumps(data, indent=2) + "\n")
    return data
