"""`python -m seiscli.train RECIPE.yaml --run-dir DIR`: set up, train, exit with a meaningful code.

Exit codes: 0 finished; 2 bad recipe or launch (one line on stderr says what to change); 1 any other
failure (traceback, then one `error:` line); 128 + signal number when stopped by a signal after a clean end
of step (143 SIGTERM, 130 SIGINT).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from seiscli.recipe import Recipe, RecipeError, load_recipe
from seiscli.train.errors import LaunchError

PROG = "python -m seiscli.train"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def check_supported(recipe: Recipe) -> None:
    """What the recipe may ask for that this trainer cannot do yet: refuse before building anything."""
    from seiscli.train.parallel import engine_class

    engine_class(recipe.parallelism.strategy)
    if recipe.parallelism.compile:
        raise RecipeError("parallelism.compile=true is not supported by this trainer yet; allowed: false")


def train(recipe: Recipe, run_dir: Path, started: float) -> int:
    # torch is imported here, after the recipe was read, so a bad recipe fails in a fraction of a second.
    from seiscli.train import distributed
    from seiscli.train.flops import recipe_flops
    from seiscli.train.model import build_model, plan_for
    from seiscli.train.parallel import build_engine
    from seiscli.train.trainer import Trainer

    check_supported(recipe)
    plan = plan_for(recipe)
    env = distributed.setup(recipe)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        model = build_model(recipe, env.device)
        if env.cp_group is not None:
            model.set_context_parallel(env.cp_group, recipe.model.attention)
        engine = build_engine(model, recipe, env)
        from seiscli.train.data import build_loader

        loader = build_loader(recipe, dp_rank=env.dp_rank, dp_size=env.dp_size, device=env.device)
        trainer = Trainer(recipe, env, engine, loader, plan, recipe_flops(recipe, plan), run_dir)
        result = trainer.run(started=started)
    finally:
        distributed.teardown()
    return EXIT_OK if result.signal is None else 128 + result.signal


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(prog=PROG, description="Train the recipe's 3D MAE (run once per process).")
    parser.add_argument("recipe", help="resolved recipe YAML written by the launcher")
    parser.add_argument("--run-dir", required=True, type=Path, help="where metrics.jsonl and summary.json go")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        return train(recipe, args.run_dir, started)
    except (RecipeError, LaunchError) as e:
        _error(str(e))
        return EXIT_USAGE
    except Exception as e:
        traceback.print_exc()
        _error(f"{type(e).__name__}: {e}")
        return EXIT_FAILED
