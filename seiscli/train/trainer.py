"""The training loop: micro-batches -> engine.forward_backward -> engine.step -> metrics, one line per step."""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from seiscli.recipe import Recipe
from seiscli.run_layout import append_event, current_attempt
from seiscli.train.attribution import PHASES, SPLIT_STRATEGIES, StepClock, split_step
from seiscli.train.checkpoint import CheckpointManager
from seiscli.train.distributed import DistEnv
from seiscli.train.flops import MAEFlops, peak_flops
from seiscli.train.metrics import MetricsLog, drop_steps_after, excluded_warmup_steps, write_summary
from seiscli.train.model import Plan, batch_masks, patchify
from seiscli.train.optim import lr_at
from seiscli.train.parallel import Engine, MicroBatch
from seiscli.train.provenance import Fault
from seiscli.train.rank_times import RankTimes
from seiscli.train.signals import BY_PRIORITY, StopRequest, priority
from seiscli.train.slurm_requeue import requeue
from seiscli.train.viewers import Viewers


@dataclass(frozen=True)
class RunResult:
    steps: int
    signal: int | None  # the signal that stopped the run early, None when it ran to the end
    summary: dict[str, Any]
    requeued: bool = False  # stopped by SIGUSR1 and Slurm accepted the requeue


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        env: DistEnv,
        engine: Engine,
        loader: Iterable[torch.Tensor],
        plan: Plan,
        flops: MAEFlops,
        run_dir: Path,
        checkpoints: CheckpointManager | None = None,
    ) -> None:
        self.recipe, self.env, self.engine, self.loader = recipe, env, engine, loader
        self.checkpoints = checkpoints
        self.plan, self.flops, self.run_dir = plan, flops, run_dir
        t = recipe.train
        self.global_batch = t.micro_batch * t.grad_accum * env.dp_size
        # Global masked-patch count of one optimizer step: every rank divides its local sum by it.
        self.loss_scale = 1.0 / (self.global_batch * plan.masked)
        self.peak = peak_flops(device_name(env.device)) if t.precision == "bf16" else None
        self.rank_times: list[float] = []
        self._heldout: torch.Tensor | None = None  # read at the first periodic eval, kept
        # Per-phase times (seiscli/train/attribution.py); backward is split at the last gradient where that
        # marks the end of backward compute.
        self.clock = StepClock(env.device, engine.module, split=recipe.parallelism.strategy in SPLIT_STRATEGIES)

    def eval_due(self, step: int) -> bool:
        every = self.recipe.eval.interval
        return every > 0 and step % every == 0

    def heldout_loss(self) -> float:
        """Masked-patch loss on the held-out crops (the same crops and masks as `seis eval`, from eval.seed);
        collective: every rank scores its slab of every crop, the sums are all-reduced."""
        from seiscli.train.heldout import eval_masks, heldout_crops

        if self._heldout is None:
            self._heldout = heldout_crops(self.recipe)
        crops, mb = self._heldout, self.recipe.train.micro_batch
        slab, s, dev = self.env.cp_rank, self.plan.slab_size, self.env.device
        total = torch.zeros((), dtype=torch.float64, device=dev)
        self.engine.module.eval()
        for first in range(0, crops.shape[0], mb):
            x = crops[first : first + mb]
            keep, masked = eval_masks(self.plan, self.recipe.eval.seed, first, x.shape[0], slab)
            patches = patchify(x.to(dev), self.recipe.model.patch_size)[:, slab * s : (slab + 1) * s]
            batch = MicroBatch(patches, keep.to(dev), masked.to(dev), offset=slab * s, with_cls=slab == 0)
            total += self.engine.evaluate(batch).double()
        self.engine.module.train()
        if self.env.distributed:
            dist.all_reduce(total)
            total /= self.env.dp_size  # every data-parallel replica scored the same crops
        return float(total) / (crops.shape[0] * self.plan.masked)

    def sample_ids(self, accum: int) -> list[int]:
        """Index of each local sample within the step's global batch (the same on all ranks of a cp group)."""
        mb = self.recipe.train.micro_batch
        first = (accum * self.env.dp_size + self.env.dp_rank) * mb
        return list(range(first, first + mb))

    def micro_batch(self, x: torch.Tensor, step: int, accum: int) -> MicroBatch:
        slab = self.env.cp_rank
        keep, masked = batch_masks(self.plan, self.recipe.train.seed, step, self.sample_ids(accum), slab)
        dev = self.env.device
        patches = patchify(x.to(dev, non_blocking=True), self.recipe.model.patch_size)
        s = self.plan.slab_size
        # The loader reads only this rank's slab (1/cp of the crop along z, tokens [slab*s, (slab+1)*s));
        # a batch of whole crops (in-memory data) is cut here to the same tokens.
        if patches.shape[1] != s:
            patches = patches[:, slab * s : (slab + 1) * s]
        return MicroBatch(
            patches,
            keep.to(dev, non_blocking=True),
            masked.to(dev, non_blocking=True),
            offset=slab * s,
            with_cls=slab == 0,
        )

    def train_step(
        self, batches: Iterator[torch.Tensor], step: int, stop: StopRequest
    ) -> tuple[dict[str, Any], int | None]:
        """One optimizer step; returns its record and the stop signal every rank agreed on (None: go on)."""
        t0 = time.perf_counter()
        clock = self.clock
        clock.begin()
        wait = 0.0
        accum = self.recipe.train.grad_accum
        loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for a in range(accum):
            tw = time.perf_counter()
            m0 = clock.mark()
            try:
                x = next(batches)
            except StopIteration:
                raise RuntimeError(f"the data loader ran out of batches at step {step + 1}") from None
            wait += time.perf_counter() - tw
            m1 = clock.mark()
            clock.span("data", m0, m1)
            mb = self.micro_batch(x, step, a)
            clock.before_backward()
            loss += self.engine.forward_backward(mb, loss_scale=self.loss_scale, sync=a == accum - 1)
            clock.forward_backward(m1, clock.mark())
        end_step = getattr(self.loader, "end_step", None)
        if end_step is not None:  # the ranks agree on dropped volumes before a checkpoint can save them
            m2 = clock.mark()
            end_step()
            # A world all-reduce, with the wait for slower ranks in it: communication. Uncovered, it was booked
            # as `other` and broke the sweep's attribution on a loaded cluster (6 points unexplained).
            clock.span("comm", m2, clock.mark())
        m3 = clock.mark()
        lr = lr_at(step, self.recipe.optim, self.recipe.train.steps)
        grad_norm = self.engine.step(lr)
        clock.span("optimizer", m3, clock.mark())
        # One collective per step: every rank's loss, stop signal (as a priority), step time so far and phases.
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)  # this rank's own time, not the kernel launches'
        phases = clock.totals()
        own = [time.perf_counter() - t0, *(phases[p] for p in PHASES)]
        mine = torch.tensor([0.0, priority(stop.signum), *own], dtype=torch.float64)
        mine = mine.to(loss.device)
        mine[0] = loss
        if self.env.distributed:
            rows = [torch.empty_like(mine) for _ in range(self.env.world_size)]
            dist.all_gather(rows, mine)
        else:
            rows = [mine]
        per_rank = torch.stack(rows).tolist()
        global_loss = sum(r[0] for r in per_rank)
        stop_code = int(max(r[1] for r in per_rank))
        times = [r[2] for r in per_rank]
        self.rank_times = times  # for rank_times.jsonl (seis top's stragglers)
        dt = time.perf_counter() - t0
        split = split_step([r[2:] for r in per_rank], dt)
        sps = self.global_batch / dt
        record: dict[str, Any] = {
            "step": step + 1,
            "loss": global_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_time_s": dt,
            "step_time_max_s": max(times),
            "straggler_ratio": max(times) / statistics.median(times),
            "data_wait_s": wait,
            "samples_per_s": sps,
            "tokens_per_s": sps * self.plan.n_tokens,
            "world_size": self.env.world_size,
            "time": time.time(),
            "tflops_per_gpu": self.flops.train * sps / self.env.world_size / 1e12,
            "time_s": split,  # seconds per phase of this step (attribution.py); they add up to step_time_s
            "comm_split": clock.comm_split,
        }
        if self.peak:
            record["mfu"] = record["tflops_per_gpu"] * 1e12 / self.peak
        if self.env.device.type == "cuda":
            record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        return record, BY_PRIORITY.get(stop_code)

    def _print(self, r: dict[str, Any]) -> None:
        extra = f" mfu {r['mfu']:.1%}" if "mfu" in r else ""
        print(
            f"step {r['step']}/{self.recipe.train.steps} loss {r['loss']:.4f} lr {r['lr']:.3g} "
            f"grad_norm {r['grad_norm']:.3g} {r['samples_per_s']:.2f} samples/s "
            f"{r['tflops_per_gpu']:.2f} TFLOP/s/gpu{extra} data_wait {r['data_wait_s']:.3f}s",
            flush=True,
        )

    def run(self, start_step: int = 0, started: float | None = None) -> RunResult:
        """Train from start_step to recipe.train.steps; `started` (a time.perf_counter() value, default now)
        is when the process started, for the summary's wall time."""
        env, t_start = self.env, time.perf_counter() if started is None else started
        steps = self.recipe.train.steps
        if env.is_main and start_step > 0:
            drop_steps_after(self.run_dir, start_step)  # steps past the checkpoint are done again
        log = MetricsLog(self.run_dir if env.is_main else None, skip=excluded_warmup_steps(steps - start_step))
        ranks = RankTimes(self.run_dir, env, self.recipe.logging.interval)
        run_id = "/".join(self.run_dir.resolve().parts[-2:])  # <recipe or name>/<run>
        viewers = Viewers(self.recipe, self.run_dir, is_main=env.is_main, start_step=start_step, run_id=run_id)
        stopped: int | None = None
        requeued = False
        status = "failed"
        # What "auto" (or a pinned backend) really runs here: kernels differ by up to 1.5x on Hopper.
        attention = self.engine.module.attention_kernel(env.device)
        if env.is_main:
            print(f"attention kernel: {attention} (model.attention={self.recipe.model.attention})", flush=True)
        ckpt = self.checkpoints
        fault = Fault.from_env()
        try:
            with StopRequest() as stop:
                batches = iter(self.loader)
                self.engine.module.train()
                for step in range(start_step, steps):
                    record, stop_now = self.train_step(batches, step, stop)
                    if self.eval_due(step + 1):
                        record["eval_loss"] = self.heldout_loss()
                        if env.is_main:
                            print(f"step {step + 1} held-out loss {record['eval_loss']:.4f}", flush=True)
                    log.log(record)
                    ranks.log(record["step"], self.rank_times)
                    viewers.log(record)
                    if fault is not None:
                        fault.maybe(record["step"], env.rank, env.world_size, self.loader)
                    last = stop_now is not None or step == steps - 1
                    if env.is_main and (record["step"] % self.recipe.logging.interval == 0 or last):
                        self._print(record)
                    if stop_now is not None:
                        stopped = stop_now  # agreed by all ranks: a rank without a signal of its own stops too
                        break
                    if ckpt is not None and not last and ckpt.due(step + 1):
                        ckpt.save(step + 1, self.engine, self.loader)
                # At the end and on a stop signal (inside the handler's scope: a second signal only waits).
                done = start_step + log.steps
                if ckpt is not None and done != ckpt.last_step:
                    ckpt.save(done, self.engine, self.loader)
                if stopped == signal.SIGUSR1:
                    requeued = self._requeue()
            status = "completed" if stopped is None else "stopped"
        finally:
            summary = log.summary(
                status=status,
                signal=stopped,
                requeued=requeued,
                steps_planned=steps,
                start_step=start_step,
                world_size=env.world_size,
                global_batch=self.global_batch,
                tokens_per_sample=self.plan.n_tokens,
                mask_ratio_effective=float(self.plan.mask_ratio),
                train_flops_per_sample=self.flops.train,
                strategy=self.recipe.parallelism.strategy,
                precision=self.recipe.train.precision,
                attention=attention,
                activation_checkpointing=self.recipe.parallelism.activation_checkpointing,
                device=device_name(env.device),
                wall_time_s=time.perf_counter() - t_start,
            )
            log.close()
            ranks.close()
            if env.is_main:
                write_summary(self.run_dir, summary)
            viewers.close(status)  # last: a tracking server that is slow to take the end must not delay the above
        return RunResult(steps=log.steps, signal=stopped, summary=summary, requeued=requeued)

    def _requeue(self) -> bool:
        """Rank 0 asks Slurm to requeue the job (after the checkpoint); every rank learns the answer before any
        exits, so no early exit can end the job (srun --kill-on-bad-exit) before the requeue is in."""
        ok = requeue(rank=self.env.rank) if self.env.is_main else False
        if ok:  # the job script's end line says "requeued", whatever srun's status as Slurm ends the attempt
            append_event(self.run_dir, {"event": "requeued_self", "attempt": current_attempt(), "time": time.time()})
        if self.env.distributed:
            flag = torch.tensor([float(ok)], dtype=torch.float64, device=self.env.device)
            dist.broadcast(flag, src=0)
            ok = bool(flag.item())
        return ok
