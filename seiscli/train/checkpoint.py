"""Checkpoints: atomic, collective saves every `checkpoint.interval` steps and on a stop signal; auto-resume.

The layout, the manifest and how the newest complete checkpoint is found are in seiscli/checkpoint_layout.py
(shared with the launcher); this module writes and restores them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
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
    recipe_changes,
    resolve_dir,
    step_dirs,
    step_name,
)
from seiscli.recipe import Optim, Recipe
from seiscli.train.errors import CheckpointError
from seiscli.train.optim import lr_at

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


def _sync_tree(root: Path) -> list[Path]:
    """fsync every file under `root`, then every directory, deepest first; returns the files. An fsync flushes
    this node's dirty pages of a file whoever wrote it, so one process per node covers every rank there."""
    files: list[Path] = []
    dirs: list[Path] = []
    for dirpath, _, names in os.walk(root):
        dirs.append(Path(dirpath))
        for name in names:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            files.append(path)
    for d in reversed(dirs):
        _fsync_dir(d)
    return files


class _SaveDeadline:
    """Ends this process (exit 1, one line) if a save has not finished on it within `seconds`: a rank hung on
    the filesystem, or waiting at a barrier for one, would otherwise hold every GPU until the process group's
    30-minute timeout. Every rank runs its own, so the whole job stops at about the same time; the unfinished
    `.tmp` directory is ignored and resume takes the previous complete checkpoint."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds, self.what = seconds, what
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="seis-save-deadline", daemon=True)

    def _watch(self) -> None:
        if not self._done.wait(self.seconds):
            print(
                f"seis: error: {self.what} did not finish within checkpoint.save_timeout_s={self.seconds:g}s (a hung "
                "filesystem or peer rank); exiting 1 instead of holding the GPUs until the process-group timeout",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)

    def __enter__(self) -> _SaveDeadline:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


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
        self.resumed_from: Path | None = None  # the checkpoint this attempt started from
        self.recipe_changes: list[str] = []  # training fields changed since that checkpoint was saved
        self.synced: list[Path] = []  # the files this rank fsynced in the last save

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
        what = f"checkpoint save of step {step} on rank {self.env.rank}"
        with _SaveDeadline(self.recipe.checkpoint.save_timeout_s, what):
            return self._save(step, engine, loader)

    def _save(self, step: int, engine: Engine, loader: Any) -> Path:
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
        # Every rank's files reach the disk before the manifest says the checkpoint is complete: one process
        # per node syncs them all (after the barrier, every rank of the node has written its own).
        self.synced = _sync_tree(tmp) if self.env.local_rank == 0 else []
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
        before the model is built so the loader can start its workers at the right position (collective).
        It is the checkpoint resume() tries first (rank 0's choice); when that one then fails to load on some
        rank, resume() falls back to an older one and re-positions the loader with its state. A trainer state
        that does not read here gives None: resume() finds and reports it."""
        import torch

        chosen = self._from_main(find_latest(self.root) if self.env.is_main else None)
        if chosen is None or not hasattr(loader, "state_dict"):
            return None
        found: Found = chosen
        if self._same_layout(found):
            mine = found.path / "trainer" / f"rank-{self.env.rank:05d}.pt"
            try:
                state = torch.load(mine, map_location="cpu", weights_only=True)
            except Exception:  # whatever a damaged file raises: resume() sets it aside and falls back
                return None
            if not isinstance(state, dict) or state.get("step") != found.step:
                return None
            loader_state = state.get("loader")
            return loader_state if isinstance(loader_state, dict) else None
        t = self.recipe.train
        return loader.state_dict() | {"position": found.step * t.micro_batch * t.grad_accum}

    def _same_layout(self, found: Found) -> bool:
        return found.manifest["world_size"] == self.env.world_size and found.manifest["cp"] == self.env.cp

    def _gather(self, value: Any) -> list[Any]:
        if not self.env.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, value)
        return out

    def resume(self, engine: Engine, loader: Any) -> int:
        """Load the newest complete checkpoint that every rank can load; returns the step to continue from (0: a
        fresh start). One that fails to load on any rank is renamed `<name>.bad`, reported, and the next older
        one tried, all ranks together (rank 0 picks, all load, all agree). Raises CheckpointError when the newest
        does not fit this run (model shape, strategy, world size) or when none of them loads."""
        bad: list[str] = []
        while True:
            chosen = self._from_main(find_latest(self.root) if self.env.is_main else None)
            if chosen is None:
                if bad:
                    raise CheckpointError(
                        f"no checkpoint under {self.root} could be loaded (renamed: {', '.join(bad)}); "
                        "fix or remove them, or start the run afresh elsewhere"
                    )
                return 0
            found: Found = chosen
            problem = incompatibility(found.manifest, self.recipe, reshardable=engine.reshardable)
            if problem:
                raise CheckpointError(f"cannot resume from {found.path}: {problem}")
            state, error = self._try_load(found, engine)
            errors = self._gather(error)
            failed = [(rank, e) for rank, e in enumerate(errors) if e]
            if not failed:
                break
            bad.append(self._set_aside(found, failed))
        step = found.step
        same_layout = self._same_layout(found)
        if state is not None:
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
        self.resumed_from = found.path
        self.recipe_changes = recipe_changes(found.manifest, self.recipe)
        if self.env.is_main and self.recipe_changes:
            print(
                f"note: this recipe differs from the one that saved step {step}; the new values apply from here on: "
                + "; ".join(self.recipe_changes)
                + _lr_jump(found.manifest["recipe"], self.recipe, step),
                flush=True,
            )
        return step

    def _try_load(self, found: Found, engine: Engine) -> tuple[dict[str, Any] | None, str | None]:
        """Load the engine and read this rank's trainer state (applied only once every rank succeeded);
        returns (trainer state or None on another layout, None) or (None, why it failed)."""
        import torch

        try:
            engine.load(found.path / "engine")
            if not self._same_layout(found):
                return None, None
            mine = found.path / "trainer" / f"rank-{self.env.rank:05d}.pt"
            state = torch.load(mine, map_location="cpu", weights_only=True)
            if state.get("step") != found.step:
                return None, f"{mine.name} holds step {state.get('step')}, the manifest {found.step}"
            return state, None
        except Exception as e:  # whatever a damaged file raises (zip, pickle, shapes): the same fallback
            return None, _first_line(e)

    def _set_aside(self, found: Found, failed: list[tuple[int, str]]) -> str:
        """Rank 0 renames a checkpoint that did not load to `<name>.bad` (never a candidate again, kept to be
        looked at) and says why; collective."""
        target = found.path.with_name(f"{found.path.name}.bad")
        if self.env.is_main:
            n = 1
            while target.exists():
                n += 1
                target = found.path.with_name(f"{found.path.name}.bad{n}")
            os.rename(found.path, target)
            _fsync_dir(self.root)
            rank, why = failed[0]
            print(
                f"seis: warning: checkpoint {found.path} (step {found.step}) could not be loaded on {len(failed)} "
                f"rank(s) (rank {rank}: {why}); renamed to {target.name}; trying the previous complete checkpoint",
                file=sys.stderr,
                flush=True,
            )
        self._barrier()
        return self._from_main(target.name)


def _lr_jump(saved: dict[str, Any], recipe: Recipe, step: int) -> str:
    """Where the learning rate goes at the resumed step, when a changed schedule moves it (a warm restart
    changes what the run learns: in QUALITY.md, runs lengthened this way ended well behind runs trained on one
    schedule for the same samples)."""
    try:
        before = lr_at(step - 1, Optim.model_validate(saved["optim"]), int(saved["train"]["steps"]))
    except (KeyError, TypeError, ValueError):  # a manifest of an older schema: say nothing rather than fail
        return ""
    after = lr_at(step, recipe.optim, recipe.train.steps)
    if abs(after - before) <= 0.05 * max(abs(before), abs(after)):
        return ""
    return f" (learning rate {before:.3g} at the last step saved, {after:.3g} at the next one)"
