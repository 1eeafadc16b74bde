"""Checkpoints: atomic, collective saves every `checkpoint.interval` steps and on a stop signal; auto-resume.

The layout, the manifest and how the newest complete checkpoint is found are in seiscli/checkpoint_layout.py
(shared with the launcher); this module writes and restores them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seiscli.checkpoint_layout import (
    FORMAT,
    LATEST,
    MANIFEST,
    Found,
    find_latest,
    incompatibility,
    model_section,
    read_manifest,
    resolve_dir,
    step_dirs,
    step_name,
)
from seiscli.recipe import Recipe
from seiscli.train.errors import CheckpointError

if TYPE_CHECKING:
    from seiscli.train.distributed import DistEnv
    from seiscli.train.parallel import Engine


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state(device: Any) -> dict[str, Any]:
    import numpy as np
    import torch

    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # as plain lists: torch.load(weights_only=True) refuses numpy arrays
        "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: Any) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class CheckpointManager:
    """Collective save and resume for one run; every rank makes the same calls in the same order."""

    def __init__(self, recipe: Recipe, env: DistEnv, run_dir: Path) -> None:
        self.recipe, self.env = recipe, env
        self.root = resolve_dir(recipe, run_dir).resolve()
        self.interval = recipe.checkpoint.interval
        self.keep = recipe.checkpoint.keep
        self.last_step: int | None = None  # the step last saved or resumed from

    # -- collectives ---------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.env.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _from_main(self, value: Any) -> Any:
        if not self.env.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- save ------------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """Whether the interval asks for a save after `step` steps."""
        return self.interval > 0 and step % self.interval == 0 and step != self.last_step

    def save(self, step: int, engine: Engine, loader: Any) -> Path:
        """Save the state after `step` steps; collective. Returns the checkpoint directory."""
        import torch

        t0 = time.perf_counter()
        name = step_name(step)
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):  # an earlier save that died half-way
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "engine").mkdir(parents=True)
            (tmp / "trainer").mkdir()
        self._barrier()
        engine.save(tmp / "engine")
        state = {"step": step, "rng": _rng_state(self.env.device)}
        if hasattr(loader, "state_dict"):
            state["loader"] = loader.state_dict()
        torch.save(state, tmp / "trainer" / f"rank-{self.env.rank:05d}.pt")
        self._barrier()
        if self.env.is_main:
            self._commit(tmp, final, step, engine)
            print(f"checkpoint {final} ({time.perf_counter() - t0:.1f} s)", flush=True)
        # Nobody leaves (and maybe exits, which ends the job) before the checkpoint is visible.
        self._barrier()
        self.last_step = step
        return final

    def _commit(self, tmp: Path, final: Path, step: int, engine: Engine) -> None:
        files = {
            str(p.relative_to(tmp)): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and not p.is_symlink()
        }
        env = self.env
        manifest = {
            "format": FORMAT,
            "step": step,
            "time": time.time(),
            "world_size": env.world_size,
            "dp_size": env.dp_size,
            "cp": env.cp,
            "strategy": self.recipe.parallelism.strategy,
            "engine": engine.name,
            "reshardable": engine.reshardable,
            "model": model_section(self.recipe),
            "recipe": self.recipe.model_dump(mode="json"),
            "files": files,
        }
        _replace_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # a broken checkpoint of this step, which resume skipped: set aside, then removed
            os.rename(final, final.with_name(f"{final.name}.replaced.tmp"))
        os.rename(tmp, final)
        _replace_text(self.root / LATEST, final.name + "\n")
        _fsync_dir(self.root)
        shutil.rmtree(final.with_name(f"{final.name}.replaced.tmp"), ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints (a corrupt one does not count) and nothing older."""
        complete = 0
        for _, path in reversed(step_dirs(self.root)):
            if complete >= self.keep:
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                read_manifest(path)
                complete += 1
            except ValueError:
                pass

    # -- resume ----------------------------------------------------------------------------------

    def loader_state(self, loader: Any) -> dict[str, Any] | None:
        """The loader state the newest complete checkpoint resumes this rank at, None on a fresh start; read
        before the model is built so the loader can start its workers at the right position (collective)."""
        import torch

        chosen = self._from_main(find_latest(self.root) if self.env.is_main else None)
        if chosen is None or not hasattr(loader, "state_dict"):
            return None
        found: Found = chosen
        if self._same_layout(found):
            mine = found.path / "trainer" / f"rank-{self.env.rank:05d}.pt"
            try:
                state = torch.load(mine, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError):
                return None  # resume() reports it
            return state.get("loader")
        t = self.recipe.train
        return loader.state_dict() | {"position": found.step * t.micro_batch * t.grad_accum}

    def _same_layout(self, found: Found) -> bool:
        return found.manifest["world_size"] == self.env.world_size and found.manifest["cp"] == self.env.cp

    def resume(self, engine: Engine, loader: Any) -> int:
        """Load the newest complete checkpoint, if any; returns the step to continue from (0: fresh start).
        Raises CheckpointError when the newest complete checkpoint cannot be loaded into this run."""
        import torch

        chosen = self._from_main(find_latest(self.root) if self.env.is_main else None)
        if chosen is None:
            return 0
        found: Found = chosen
        problem = incompatibility(found.manifest, self.recipe, reshardable=engine.reshardable)
        if problem:
            raise CheckpointError(f"cannot resume from {found.path}: {problem}")
        try:
            engine.load(found.path / "engine")
        except CheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot resume from {found.path}: {first}") from e
        step = found.step
        mine = found.path / "trainer" / f"rank-{self.env.rank:05d}.pt"
        same_layout = self._same_layout(found)
        if same_layout:
            state = torch.load(mine, map_location="cpu", weights_only=True)
            _set_rng_state(state["rng"], self.env.device)
            if hasattr(loader, "load_state_dict") and "loader" in state:
                loader.load_state_dict(state["loader"])
        elif hasattr(loader, "load_state_dict"):
            # Another world size: every rank has consumed the same number of samples of its own stream;
            # RNG states belong to ranks that no longer exist (the trainer's masks do not use them).
            t = self.recipe.train
            loader.load_state_dict(loader.state_dict() | {"position": step * t.micro_batch * t.grad_accum})
        if self.env.is_main:
            note = "" if same_layout else f" (saved by {found.manifest['world_size']} processes; RNG not restored)"
            print(f"resumed from {found.path} at step {step}{note}", flush=True)
        self.last_step = step
        return step
