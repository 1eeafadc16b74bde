"""Crops shipped as stored through shared ring slots and normalised on the device (issue 13): the numbers the
model sees are today's, bit for bit; the ring is shared with worker processes; the loader starts before the
model is built."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from seiscli.recipe import Recipe, load_recipe, validate
from seiscli.train.batch_transfer import SlotRing, centre_inv_scale, normalize_batch, ring_slots
from seiscli.train.data import CropLoader, build_loader, normalize_

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def make_recipe(**data: Any) -> Recipe:
    d = {"source": "synthetic", "synth_shape": [40, 40, 48], "crop": [16, 16, 32], "workers": 0, **data}
    return validate({"name": "t", "model": {"patch_size": 8}, "data": d, "train": {"micro_batch": 2, "seed": 3}})


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("zscore", [True, False])
def test_device_normalisation_is_the_host_normalisation_bit_for_bit(device: torch.device, zscore: bool) -> None:
    rng = np.random.default_rng()
    x = (rng.standard_normal((3, 1, 8, 9, 10)) * 7 + 2).astype(np.float32)
    x[0, 0, 1, :3], x[1, 0, 2, 3, 4], x[2, 0, 3, 4, 5] = np.nan, np.inf, -np.inf
    rows = [(float(rng.normal()), float(rng.uniform(0.5, 3))) for _ in range(3)] if zscore else None
    want = x.copy()
    for i in range(3):
        normalize_(want[i, 0], rows[i] if rows else None, 2.5)
    centre, inv = centre_inv_scale(rows)
    got = torch.from_numpy(x.copy()).to(device)
    normalize_batch(got, None if centre is None else centre.to(device), None if inv is None else inv.to(device), 2.5)
    assert np.array_equal(got.cpu().numpy(), want)  # the same bits, not merely close
    assert not np.array_equal(want, x)  # the check saw a real normalisation


def _fill_slot(ring: SlotRing, slot: int, value: float) -> None:
    ring.array()[slot][...] = value


def test_ring_slots_are_shared_with_forkserver_workers() -> None:
    ring = SlotRing(ring_slots(2, 2), (2, 3, 4), np.float32)
    assert ring.slots == 6
    ring.array()[...] = -1.0
    ctx = mp.get_context("forkserver")
    procs = [ctx.Process(target=_fill_slot, args=(ring, s, s + 0.5)) for s in (1, 4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a = ring.array()
    assert (a[1] == 1.5).all() and (a[4] == 4.5).all() and (a[[0, 2, 3, 5]] == -1.0).all()
    ring.close()


def host_batches(loader: CropLoader, n: int) -> list[torch.Tensor]:
    """Today's path: the dataset builds normalised float32 batches itself."""
    return [loader.dataset[p][0] for p in range(0, n * loader.micro_batch, loader.micro_batch)]


@pytest.mark.parametrize(("workers", "lookahead"), [(0, False), (0, True), (2, True), (2, False)])
def test_loader_batches_equal_host_normalised_batches(data_dir: Path, workers: int, lookahead: bool) -> None:
    """Ring slots (2 * prefetch + 2 of them) are reused many times over: every batch must still be its own."""
    loader = build_loader(
        make_recipe(workers=workers, prefetch=1, clip=2.0, lookahead=lookahead), dp_rank=0, dp_size=1, device=CPU
    )
    assert loader.lookahead is lookahead  # data.lookahead reaches the loader
    n = 3 * ring_slots(workers, 1) + 1
    got = list(itertools.islice(iter(loader), n))
    want = host_batches(build_loader(make_recipe(clip=2.0), dp_rank=0, dp_size=1, device=CPU), n)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    assert loader.stats()["samples"] == 2 * n and loader.position == 2 * n


def test_a_started_loader_keeps_its_batches_when_the_resume_state_matches(data_dir: Path) -> None:
    loader = build_loader(make_recipe(workers=1), dp_rank=0, dp_size=1, device=CPU)
    loader.start()
    pump = loader._pump
    loader.load_state_dict(loader.state_dict())  # what resume() does on a fresh run's checkpoint position
    assert loader._pump is pump is not None
    loader.load_state_dict(loader.state_dict() | {"position": 4})  # another position: restart there
    assert loader._pump is None and loader.position == 4
    first = next(iter(loader))
    assert torch.equal(first, host_batches(build_loader(make_recipe(), dp_rank=0, dp_size=1, device=CPU), 3)[2])
    loader.close()


def test_the_first_batches_are_requested_before_the_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ordering, not timing: when build_model runs, the rank's loader has started its worker and handed it
    the first batch indices (the real build_model and trainer run afterwards)."""
    import seiscli.train.data as data_mod
    import seiscli.train.model as model_mod
    from seiscli.train.entry import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SEIS_DATA_DIR", str(tmp_path / "data"))
    seen: list[tuple[int, int]] = []
    real = model_mod.build_model

    def build_model_after_the_loader(recipe: Recipe, device: torch.device) -> Any:
        for ld in list(data_mod._LIVE_LOADERS):
            it = ld._workers_iter
            seen.append((int(ld._pump is not None), it._send_idx if it is not None else 0))
        return real(recipe, device)

    monkeypatch.setattr(model_mod, "build_model", build_model_after_the_loader)
    overrides = {
        "cluster.cpu_procs_per_node": 1,
        "train.steps": 2,
        "train.micro_batch": 2,
        "data.workers": 1,
        "data.prefetch": 2,
        "model.encoder_dim": 32,
        "model.decoder_dim": 16,
        "data.crop": [16, 16, 16],
        "data.synth_shape": [32, 32, 32],
    }
    path = tmp_path / "r.yaml"
    path.write_text(load_recipe("smoke", overrides).to_yaml())
    assert main([str(path), "--run-dir", str(tmp_path / "run")]) == 0
    assert seen == [(1, 2)]  # one loader, started, both prefetch slots of its worker asked for
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 2
