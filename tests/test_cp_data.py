"""Sample identity across a context-parallel group (issue 11, item 1), with real processes (gloo), a real S3
server (moto over HTTP) and its fault-injecting proxy.

The ranks of a CP group read different slabs of one sample; these tests check that they keep reading slabs of
the same crop when one rank's reads of a volume fail, that the per-micro-batch guard stops a group whose
samples differ, and that the volume list is globbed once and broadcast.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from seiscli.data.s3local import FaultProxy, Faults, MotoS3
from seiscli.data.synth import synthetic_volume
from seiscli.data.write import write_volume
from seiscli.train.data import build_loader
from tests.distributed import run_distributed
from tests.test_s3 import CHUNKS, SHAPE, put_volumes, recipe

CPU = torch.device("cpu")


def _end_step(loader: Any) -> None:
    end_step = getattr(loader, "end_step", None)  # absent before issue 11: then there is no step agreement
    if end_step is not None:
        end_step()


def _cp_stream(rank: int, world: int, recipes: list[dict], batches: int, out: str, cp: int = 2) -> Any:
    """Each rank's slabs of `batches` micro-batches, two micro-batches a step (cp=world: one group)."""
    torch.set_num_threads(1)
    from seiscli.recipe import validate

    dp, dp_rank, cp_rank = world // cp, rank // cp, rank % cp
    recipe_ = validate(recipes[rank])
    loader = build_loader(recipe_, dp_rank=dp_rank, dp_size=dp, device=CPU, cp_rank=cp_rank, cp_size=cp)
    it = iter(loader)
    slabs = []
    for b in range(batches):
        slabs.append(next(it))
        if b % 2 == 1:
            _end_step(loader)
    loader.close()
    mine = torch.stack(slabs)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine)
    states: list[Any] = [None] * world
    dist.all_gather_object(states, (loader.state_dict(), loader.stats()))
    # (batches, micro_batch, 1, z, y, x), the slabs put back along z; in a file (the result pipe is small)
    if rank == 0:
        torch.save(torch.cat(rows, dim=3), out)
    return states


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_cp_group_reads_one_crop_when_one_rank_cannot_read_a_volume(
    s3_server: MotoS3, s3_bucket: str, tmp_path: Path, workers: int
) -> None:
    """The issue's case: cp=2, two volumes, rank 0's reads of b fail for good (503 through its proxy), rank 1's
    succeed. Before the fix rank 0 dropped b alone and redrew, so most samples had slabs of different crops."""
    uris = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1, "b": 2})
    broken = FaultProxy(s3_server.endpoint, Faults(slowdown=1.0, match="/b.mdio/amplitude/c/"))
    try:
        data = {"crop": [16, 16, 32], "retries": 2, "workers": workers}
        recipes = [recipe(uris, ep, **data).model_dump(mode="json") for ep in (broken.endpoint, s3_server.endpoint)]
        n = 6
        states = run_distributed(_cp_stream, 2, recipes, n, str(tmp_path / "crops.pt"), timeout=240)
        crops = torch.load(tmp_path / "crops.pt")
        injected = broken.faults.counts["slowdown"]
    finally:
        broken.stop()
    # Reference: one process reading whole crops with b dropped from the start. Dropping b changes no draw that
    # fell on a, so every sample must be exactly this crop, its two slabs included.
    ref = build_loader(recipe(uris, s3_server.endpoint, crop=[16, 16, 32]), dp_rank=0, dp_size=1, device=CPU)
    ref.load_state_dict(ref.state_dict() | {"dropped": [uris[1]]})
    expected = torch.stack(list(itertools.islice(iter(ref), n)))
    mixed = [(b, i) for b in range(n) for i in range(expected.shape[1]) if not torch.equal(crops[b, i], expected[b, i])]
    assert not mixed, f"{len(mixed)} of {n * expected.shape[1]} samples have slabs from different crops: {mixed}"
    assert injected > 0  # rank 0 really failed to read b
    (state0, stats0), (state1, stats1) = states
    assert stats0["samples_lost"] >= 1 and stats0["failed_reads"] >= 3 and stats1["samples_lost"] == 0
    assert state0 == state1 and state0["dropped"] == [uris[1]]  # the checkpoint state agrees


def _guard(rank: int, world: int, recipes: list[dict]) -> str | None:
    torch.set_num_threads(1)
    from seiscli.recipe import validate

    loader = build_loader(validate(recipes[rank]), dp_rank=0, dp_size=1, device=CPU, cp_rank=rank, cp_size=world)
    try:
        next(iter(loader))
    except RuntimeError as e:
        return str(e)
    finally:
        loader.close()
    return None


@pytest.mark.slow
def test_guard_stops_a_cp_group_whose_samples_differ(tmp_path: Path) -> None:
    """Forced mismatch: the two ranks of a cp group are given different seeds (same volumes), so they draw
    different crops. The guard must stop both at the first micro-batch, naming the position."""
    uri = str(tmp_path / "a.mdio")
    write_volume(uri, synthetic_volume(SHAPE, 1), chunks=CHUNKS)
    recipes = []
    for seed in (3, 4):
        r = recipe([uri], None, crop=[16, 16, 32]).model_dump(mode="json")
        r["train"]["seed"] = seed
        recipes.append(r)
    message = run_distributed(_guard, 2, recipes, timeout=120)
    assert message is not None, "the cp group trained on slabs of different crops without an error"
    assert "context-parallel group of ranks 0..1 disagrees on the samples at stream position 0" in message


class _RecordingProxy(FaultProxy):
    """The fault proxy (no faults) that also records each request it has answered."""

    def __init__(self, upstream: str) -> None:
        self.answered: list[str] = []
        super().__init__(upstream)

    async def _handle(self, request: Any, session: Any) -> Any:
        response = await super()._handle(request, session)
        self.answered.append(f"{request.method} {request.path_qs}")
        return response


def _volume_list(rank: int, world: int, recipes: list[dict], flag: str) -> list[list[str]]:
    torch.set_num_threads(1)
    from seiscli.recipe import validate

    if rank == 1:  # starts once a volume has appeared under the prefix after rank 0 listed it
        deadline = time.monotonic() + 120
        while not Path(flag).exists():
            assert time.monotonic() < deadline, "the new volume was never written"
            time.sleep(0.05)
    loader = build_loader(validate(recipes[rank]), dp_rank=rank, dp_size=world, device=CPU)
    lists: list[Any] = [None] * world
    dist.all_gather_object(lists, [v.uri for v in loader.dataset.volumes])
    return lists


@pytest.mark.slow
def test_volume_list_is_globbed_once_and_broadcast(s3_server: MotoS3, s3_bucket: str, tmp_path: Path) -> None:
    """c.mdio appears under the prefix after rank 0 listed it and before rank 1 starts: both ranks must still
    train on the list rank 0 saw."""
    a, b = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1, "b": 2})
    proxy = _RecordingProxy(s3_server.endpoint)
    flag = tmp_path / "c-written"

    def write_c_after_the_listing() -> None:
        deadline = time.monotonic() + 120
        while not any("list-type" in r for r in proxy.answered) and time.monotonic() < deadline:
            time.sleep(0.02)
        put_volumes(s3_bucket, s3_server.endpoint, {"c": 3})
        flag.touch()

    writer = threading.Thread(target=write_c_after_the_listing, daemon=True)
    writer.start()
    try:
        recipes = [
            recipe([f"{s3_bucket}/*.mdio"], ep, crop=[16, 16, 32]).model_dump(mode="json")
            for ep in (proxy.endpoint, s3_server.endpoint)  # rank 0 lists through the recording proxy
        ]
        lists = run_distributed(_volume_list, 2, recipes, str(flag), timeout=180)
    finally:
        writer.join(timeout=130)
        proxy.stop()
    assert flag.exists()
    assert lists == [[a, b], [a, b]]


@pytest.mark.slow
def test_every_rank_saves_the_same_drop_set(s3_server: MotoS3, s3_bucket: str, tmp_path: Path) -> None:
    """cp=1, two data-parallel ranks, only rank 0 cannot read b: at the step boundary rank 1 drops b too, so the
    loader state a checkpoint saves is the same on both (it was rank 0's alone before)."""
    uris = put_volumes(s3_bucket, s3_server.endpoint, {"a": 1, "b": 2})
    broken = FaultProxy(s3_server.endpoint, Faults(slowdown=1.0, match="/b.mdio/amplitude/c/"))
    try:
        data = {"crop": [16, 16, 32], "retries": 2}
        recipes = [recipe(uris, ep, **data).model_dump(mode="json") for ep in (broken.endpoint, s3_server.endpoint)]
        states = run_distributed(_cp_stream, 2, recipes, 4, str(tmp_path / "crops.pt"), 1, timeout=240)
    finally:
        broken.stop()
    (state0, stats0), (state1, stats1) = states
    assert state0["dropped"] == state1["dropped"] == [uris[1]]
    assert stats0["samples_lost"] >= 1 and stats1["samples_lost"] == 0  # only rank 0 failed to read b
    assert stats1["volumes_dropped"] == 1 and stats1["volumes_active"] == 1
