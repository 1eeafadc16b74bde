"""`python -m seiscli.train RECIPE.yaml --run-dir DIR`: set up, train, exit with a meaningful code.

Exit codes (seiscli/run_layout.py; the job script's retry policy acts on them): 0 finished (or checkpointed and
requeued after SIGUSR1); 2 bad recipe or launch, or a checkpoint this run cannot resume from, or none that loads
(one line on stderr says what to change); 3 a communication failure (NCCL/gloo error or timeout, a peer gone);
4 a data-loader worker killed (OOM killer); 1 any other failure (traceback, then one `error:` line; a checkpoint
save past checkpoint.save_timeout_s: one line); 128 + signal number when stopped by a signal after a clean end
of step and a checkpoint (143 SIGTERM, 130 SIGINT, 138 SIGUSR1 outside Slurm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from seiscli.recipe import Recipe, RecipeError, load_recipe
from seiscli.run_layout import EXIT_OK, EXIT_USAGE
from seiscli.train.errors import CheckpointError, LaunchError
from seiscli.train.failure import note_failure, note_start
from seiscli.train.provenance import classify_exit, record_rank_exit
from seiscli.train.signals import catch_early_usr1

PROG = "python -m seiscli.train"


def _error(msg: str) -> None:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)


def train(recipe: Recipe, run_dir: Path, started: float, *, sweep: bool = False, leave: bool = False) -> int:
    """Run the recipe; the exit code. leave (the `python -m seiscli.train` program): end the process with that
    code once the run is over and recorded, without returning (see the end)."""
    note_start()
    # torch is imported here, after the recipe was read, so a bad recipe fails in a fraction of a second.
    from seiscli.train import distributed
    from seiscli.train.flops import recipe_flops
    from seiscli.train.model import build_model, plan_for
    from seiscli.train.parallel import build_engine
    from seiscli.train.trainer import Trainer
    from seiscli.train.viewers import check_viewers

    check_viewers(recipe)  # a viewer the recipe asks for but the environment lacks: exit 2 before any work
    plan = plan_for(recipe)
    env = distributed.setup(recipe)
    code = EXIT_OK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # its workers build crops while the model builds; no CheckpointManager in a sweep run
        loader, checkpoints = start_loader(recipe, env, run_dir, sweep=sweep)
        model = build_model(recipe, env.device)
        if env.cp_group is not None:
            model.set_context_parallel(env.cp_group, recipe.model.attention)
        engine = build_engine(model, recipe, env)
        if env.is_main:  # e.g. the generated DeepSpeed config, kept with the run
            for name, content in engine.config_files().items():
                (run_dir / name).write_text(json.dumps(content, indent=2) + "\n")
        start = 0
        if sweep:
            # A scaling-sweep size: a short measuring run. No checkpoints; the allocation's collective
            # bandwidth first (collectives.json), so the report can set measured comm against it.
            from seiscli.train.attribution import bench_collectives

            bench_collectives(env.device, run_dir if env.is_main else None)
        else:
            start = checkpoints.resume(engine, loader)  # 0 when there is no checkpoint yet
        from seiscli.train.provenance import record_start

        record_start(
            run_dir,
            is_main=env.is_main,
            distributed=env.distributed,
            world_size=env.world_size,
            first_step=start,
            resumed_from=checkpoints.resumed_from if checkpoints else None,
            recipe_changes=checkpoints.recipe_changes if checkpoints else None,
        )
        trainer = Trainer(recipe, env, engine, loader, plan, recipe_flops(recipe, plan), run_dir, checkpoints)
        result = trainer.run(start_step=start, started=started)
        if sweep and env.distributed and result.signal is None:
            # Every rank has finished its last collective before any rank tears down (no end-of-run
            # checkpoint lines them up in a sweep run).
            import torch.distributed as dist

            dist.barrier()
        # Requeued: Slurm ends this attempt and starts the job again, which resumes from the checkpoint.
        code = EXIT_OK if result.signal is None or result.requeued else 128 + result.signal
    except Exception as e:
        code = _failure_code(e)
    finally:
        # The exit is recorded before the process group goes: a peer that then fails on the broken group must
        # not be recorded first, or the ledger would name the consequence as the cause.
        if code != EXIT_OK:
            record_rank_exit(run_dir, code)
        distributed.teardown()
    if leave:
        # Everything the run writes is written and its exit recorded. Releasing this frame's engine and model
        # after teardown sometimes blocked for minutes on 2 gloo nodes (faulthandler: main thread in C code at
        # this function's return; seen in sweep sizes, which it ran into their step limit); a job's last rank
        # blocked so would hold the whole allocation. Leave without releasing them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _failure_code(e: Exception) -> int:
    """Report an exception on stderr and map it to the exit code the job script's retry policy reads."""
    if isinstance(e, (RecipeError, LaunchError, CheckpointError)):
        _error(str(e))
        return EXIT_USAGE
    traceback.print_exc()
    _error(f"{type(e).__name__}: {e}")
    note_failure()
    return classify_exit(e)


def start_loader(recipe: Recipe, env: Any, run_dir: Path, *, sweep: bool = False) -> tuple[Any, Any]:
    """The rank's loader, started at the position the run resumes from, and the run's CheckpointManager (None
    in a sweep run, which neither saves nor resumes: its loader starts at position 0).

    No start-up transient (issue 13): the workers start and the first crops are requested now, before the
    model is built (and compiled), so step 1 does not wait for them; resume() later finds the loader already
    at its checkpoint's position and keeps the batches under way (or, when that checkpoint does not load and
    resume() falls back to an older one, re-positions the loader with the older one's state)."""
    from seiscli.train.checkpoint import CheckpointManager
    from seiscli.train.data import build_loader

    loader = build_loader(
        recipe, dp_rank=env.dp_rank, dp_size=env.dp_size, device=env.device, cp_rank=env.cp_rank, cp_size=env.cp
    )
    checkpoints = None if sweep else CheckpointManager(recipe, env, run_dir)
    state = checkpoints.loader_state(loader) if checkpoints is not None else None
    if state is not None:
        loader.load_state_dict(state)
    loader.start()
    return loader, checkpoints


def main(argv: list[str] | None = None, *, leave: bool = False) -> int:
    """The trainer's command line; the exit code. leave: see train() (in-process callers, e.g. tests, return)."""
    started = time.perf_counter()
    catch_early_usr1()
    parser = argparse.ArgumentParser(prog=PROG, description="Train the recipe's 3D MAE (run once per process).")
    parser.add_argument("recipe", help="resolved recipe YAML written by the launcher")
    parser.add_argument("--run-dir", required=True, type=Path, help="where metrics.jsonl and summary.json go")
    parser.add_argument(
        "--sweep", action="store_true", help="a scaling-sweep measurement: collective benchmark, no checkpoints"
    )
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe)
        return train(recipe, args.run_dir, started, sweep=args.sweep, leave=leave)  # records its own failures
    except Exception as e:  # before the process group exists: the recipe, the viewers, the rendezvous
        code = _failure_code(e)
        if args.run_dir.is_dir():
            record_rank_exit(args.run_dir, code)
        return code
