"""Where checkpoints live and what their manifests say: shared by the trainer (which writes them, in
seiscli/train/checkpoint.py) and the launcher (`seis launch --resume` checks them before submitting).

No torch, no numpy: the launcher imports this module.

Layout of `checkpoint.dir` (default `<run dir>/checkpoints`):

    step-000120/               one complete checkpoint (a `.tmp` suffix while it is being written)
      engine/                  what Engine.save wrote (model and optimizer; replicas or shards)
      trainer/rank-00000.pt    per rank: step, RNG states (python, numpy, torch, cuda), loader position
      manifest.json            written last, by rank 0: step, world, strategy, model section, file sizes
    latest                     "step-000120": moved (write + os.replace) after the rename

A checkpoint becomes visible only by the rename of its finished `.tmp` directory, so a crash mid-save
leaves a `.tmp` that resume ignores. Resume takes the newest directory whose manifest is present and whose
files all have the sizes it lists; any other is skipped with a warning naming it. One whose files then fail
to load is renamed `step-000120.bad` (no longer a candidate) and the next older one tried. `latest` is for people
and tools; resume does not trust it (the process may have died between the rename and the pointer).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seiscli.recipe import Recipe, flatten

FORMAT = 1
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")
# Model fields that may differ between a checkpoint and the run resuming it: a kernel choice, not a shape.
_MODEL_FREE = frozenset({"attention"})
# Sections that decide what a run learns from and how. A resume may change them (raising train.steps is how a
# run is lengthened), but the learning-rate schedule and the sample stream then follow the new values from the
# resumed step on, so the change is said and recorded. Knobs that change speed, not what is trained, are left out.
_TRAINING_SECTIONS = ("train", "optim", "data")
_SPEED_ONLY = frozenset(
    {
        "train.device",
        "train.threads",
        "data.workers",
        "data.prefetch",
        "data.lookahead",
        "data.concurrency",
        "data.retries",
        "data.s3_client",
        "data.endpoint_url",
        "data.region",
    }
)


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def resolve_dir(recipe: Recipe, run_dir: Path) -> Path:
    return Path(recipe.checkpoint.dir) if recipe.checkpoint.dir else run_dir / "checkpoints"


def model_section(recipe: Recipe) -> dict[str, Any]:
    return {k: v for k, v in recipe.model.model_dump(mode="json").items() if k not in _MODEL_FREE}


def incompatibility(manifest: dict[str, Any], recipe: Recipe, *, reshardable: bool | None = None) -> str | None:
    """Why this recipe cannot resume from the checkpoint of `manifest` (None when it can). `reshardable`:
    whether the engine loads another world size (None: not known here, e.g. in the launcher)."""
    saved, mine = manifest.get("model", {}), model_section(recipe)
    diff = [f"model.{k}={saved.get(k)!r} there, {mine.get(k)!r} here" for k in sorted(mine) if saved.get(k) != mine[k]]
    if diff:
        return "another model shape: " + "; ".join(diff) + " (resume needs the same model section)"
    strategy = recipe.parallelism.strategy
    if manifest.get("strategy") != strategy:
        return (
            f"saved with parallelism.strategy={manifest.get('strategy')!r}, this run uses {strategy!r}; "
            "resume with the same strategy"
        )
    if reshardable is False and manifest.get("world_size") != recipe.cluster.world_size:
        return (
            f"saved with world size {manifest.get('world_size')}, this run has {recipe.cluster.world_size}, and "
            f"strategy {strategy!r} cannot reshard its checkpoint; resume with {manifest.get('world_size')} processes"
        )
    return None


def recipe_changes(manifest: dict[str, Any], recipe: Recipe) -> list[str]:
    """The training fields (`train.steps 1500 -> 3000`) in which `recipe` differs from the one that saved the
    checkpoint of `manifest`; empty when they agree or the manifest holds no recipe."""
    saved_recipe = manifest.get("recipe")
    if not isinstance(saved_recipe, dict):
        return []
    mine_recipe = recipe.model_dump(mode="json")
    saved = flatten({s: saved_recipe.get(s) or {} for s in _TRAINING_SECTIONS})
    mine = flatten({s: mine_recipe[s] for s in _TRAINING_SECTIONS})
    keys = sorted((saved.keys() | mine.keys()) - _SPEED_ONLY)
    return [f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" for k in keys if saved.get(k) != mine.get(k)]


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory `path` after checking every listed file; ValueError says why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError("no manifest (an interrupted save?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable manifest: {e}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ValueError(f"manifest is not format {FORMAT}")
    for rel, size in manifest["files"].items():
        try:
            actual = (path / rel).stat().st_size
        except OSError:
            raise ValueError(f"{rel} is missing") from None
        if actual != size:
            raise ValueError(f"{rel} has {actual} bytes, the manifest says {size}")
    return manifest


@dataclass(frozen=True)
class Found:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Finished-looking checkpoint directories (no `.tmp`), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(root: Path, warn: bool = True) -> Found | None:
    """The newest complete checkpoint under `root`; incomplete or corrupt ones are skipped with a warning."""
    for _, path in reversed(step_dirs(root)):
        try:
            return Found(path, read_manifest(path))
        except ValueError as e:
            if warn:
                print(f"seis: warning: skipping checkpoint {path}: {e}", file=sys.stderr, flush=True)
    return None
