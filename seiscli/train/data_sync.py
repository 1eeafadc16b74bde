"""What the ranks of a run agree on, so that the ranks of a context-parallel group draw the same samples.

Under context parallelism the ranks of a CP group read different slabs of one sample; their sample streams
must therefore depend only on state they all hold: the seed, the position, the volume list and the set of
dropped volumes. This module makes the last two shared and checks the result:

- the volume list is globbed once, by rank 0, and broadcast (a volume appearing under a prefix during start-up
  would otherwise give ranks different lists); a digest of what every rank opened is then compared;
- a volume is dropped only by agreement: within a CP group at the micro-batch whose read failed (every rank
  of the group drops it and the group redraws that micro-batch), across the whole run at every step boundary
  (the union of the drop sets), so a checkpoint holds the same drop set on every rank;
- guard: each micro-batch the CP group compares a 63-bit digest of its samples' (volume, origin, flips) and
  stops with an error on a mismatch instead of training on slabs of different crops.

Every collective runs on a CPU gloo group: no GPU stream is synchronised and NCCL is not involved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def digest(*parts: Any) -> int:
    """A stable 63-bit digest of `parts` (their repr), the same in every process (unlike hash())."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class SampleMismatch(RuntimeError):
    """The ranks of a CP group were about to train on slabs of different samples."""


class DataSync:
    """The loader's collectives. Build it with `create` on every rank, in the same order as other groups."""

    def __init__(self, world: Any, cp_group: Any, cp_size: int) -> None:
        self.world, self.cp_group, self.cp_size = world, cp_group, cp_size

    @classmethod
    def create(cls, cp_size: int) -> DataSync:
        """Collective: gloo groups for the world and for this rank's CP group (consecutive ranks)."""
        rank, size = dist.get_rank(), dist.get_world_size()
        gloo = dist.get_backend() == "gloo"
        world = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        mine = None
        if cp_size > 1:
            for first in range(0, size, cp_size):
                group = dist.new_group(list(range(first, first + cp_size)), backend="gloo")
                if first <= rank < first + cp_size:
                    mine = group
        return cls(world, mine, cp_size)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable), on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.world)
        return box[0]

    def decide(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone; its result, or its exception, on every rank (no rank waits forever)."""
        outcome: tuple[bool, Any] = (True, None)
        if dist.get_rank() == 0:
            try:
                outcome = (True, fn())
            except Exception as e:
                outcome = (False, e)
        ok, value = self.broadcast(outcome)
        if not ok:
            raise value
        return value

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless every rank passed the same 63-bit `value`."""
        t = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.world)
        if t[0].item() != -t[1].item():
            raise SampleMismatch(f"the ranks of this run disagree on {what}")

    def union(self, dropped: set[int], n: int, agreed: int) -> set[int]:
        """The union of every rank's drop set. `agreed`: the size of the set all ranks shared at the last call
        (-1 if unknown); when no rank has added to it, one scalar all-reduce is all it costs."""
        grown = torch.tensor([len(dropped) - agreed], dtype=torch.int64)
        dist.all_reduce(grown, group=self.world)
        if grown.item() == 0:
            return set(dropped)
        bits = torch.zeros(n, dtype=torch.int64)
        bits[sorted(dropped)] = 1
        dist.all_reduce(bits, op=dist.ReduceOp.MAX, group=self.world)
        return set(bits.nonzero().flatten().tolist())

    def check_batch(self, position: int, sample_digest: int, lost: Iterable[int], slots: int) -> set[int]:
        """CP group, once per micro-batch: raise SampleMismatch unless every rank holds the same samples;
        return the volumes any rank of the group failed to read (the group drops them and redraws)."""
        lost = sorted(set(lost))
        if self.cp_group is None:
            return set(lost)
        mine = torch.full((1 + slots,), -1, dtype=torch.int64)
        mine[0] = sample_digest
        mine[1 : 1 + len(lost)] = torch.tensor(lost[:slots], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(self.cp_size)]
        dist.all_gather(rows, mine, group=self.cp_group)
        digests = [int(r[0]) for r in rows]
        if len(set(digests)) > 1:
            first = dist.get_process_group_ranks(self.cp_group)[0]
            raise SampleMismatch(
                f"context-parallel group of ranks {first}..{first + self.cp_size - 1} disagrees on the samples "
                f"at stream position {position} (digests {', '.join(f'{d:016x}' for d in digests)}): its slabs "
                "would come from different crops. The ranks' volume lists, drop sets, seeds or data settings "
                "differ; stopping rather than training on mixed samples"
            )
        return {int(v) for r in rows for v in r[1:].tolist() if v >= 0}
