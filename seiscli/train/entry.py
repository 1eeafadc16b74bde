"""`python -m seiscli.train RECIPE.yaml --run-dir DIR`: set up, train, exit with a meaningful code.

Exit codes: 0 finished (or checkpointed and requeued after SIGUSR1); 2 bad recipe or launch, or a checkpoint
this run cannot resume from (one line on stderr says what to change); 1 any other failure (traceback, then
one `error:` line); 128 + signal number when stopped by a signal after a clean end of step and a checkpoint
(143 SIGTERM, 130 SIGINT, 138 SIGUSR1 outside Slurm).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from seiscli.recipe import Recipe, RecipeError, load_recipe
from seiscli.train.errors import CheckpointError, LaunchError
from seiscli.train.signals import catch_early_usr1

PROG = "python -m seiscli.train"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def train(recipe: Recipe, run_dir: Path, started: float) -> int:
    # torch is imported here, after the recipe was read, so a bad recipe fails in a fraction of a second.
    from seiscli.train import distributed
    from seiscli.train.flops import recipe_flops
    from seiscli.train.model import build_model, plan_for
    from seiscli.train.parallel import build_engine
    from seiscli.train.trainer import Trainer

    plan = plan_for(recipe)
    env = distributed.setup(recipe)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        loader, checkpoints = start_loader(recipe, env, run_dir)  # its workers build crops while the model builds
        model = build_model(recipe, env.device)
        if env.cp_group is not None:
            model.set_context_parallel(env.cp_group, recipe.model.attention)
        engine = build_engine(model, recipe, env)
        if env.is_main:  # e.g. the generated DeepSpeed config, kept with the run
            for name, content in engine.config_files().items():
                (run_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        start = checkpoints.resume(engine, loader)  # 0 when there is no checkpoint yet
        trainer = Trainer(recipe, env, engine, loader, plan, recipe_flops(recipe, plan), run_dir, checkpoints)
        result = trainer.run(start_step=start, started=started)
    finally:
        distributed.teardown()
    # Requeued: Slurm ends this attempt and starts the job again, which resumes from the checkpoint.
    return EXIT_OK if result.signal is None or result.requeued else 128 + result.signal


def start_loader(recipe: Recipe, env: Any, run_dir: Path) -> tuple[Any, Any]:
    """The rank's loader, started at the position the run resumes from, and the run's CheckpointManager.

    No start-up transient (issue 13): the workers start and the first crops are requested now, before the
    model is built (and compiled), so step 1 does not wait for them; resume() later finds the loader already
    at its checkpoint's position and keeps the batches under way."""
    from seiscli.train.checkpoint import CheckpointManager
    from seiscli.train.data import build_loader

    loader = build_loader(
        recipe, dp_rank=env.dp_rank, dp_size=env.dp_size, device=env.device, cp_rank=env.cp_rank, cp_size=env.cp
    )
    checkpoints = CheckpointManager(recipe, env, run_dir)
    state = checkpoints.loader_state(loader)
    if state is not None:
        loader.load_state_dict(state)
    loader.start()
    return loader, checkpoints


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    catch_early_usr1()
    parser = argparse.ArgumentParser(prog=PROG, description="Train the recipe's 3D MAE (run once per process).")
    parser.add_argument("recipe", help="resolved recipe YAML written by the launcher")
    parser.add_argument("--run-dir", required=True, type=Path, help="where metrics.jsonl and summary.json go")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        return train(recipe, args.run_dir, started)
    except (RecipeError, LaunchError, CheckpointError) as e:
        _error(str(e))
        return EXIT_USAGE
    except Exception as e:
        traceback.print_exc()
        _error(f"{type(e).__name__}: {e}")
        return EXIT_FAILED
