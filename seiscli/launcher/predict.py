"""An alpha-beta model of one training step per parallel strategy, for `seis scale-sweep --predict`.

Torch-free: the model's sizes come from the recipe. Everything the model assumes is a named field below.

Step time at n GPUs = compute (measured on one GPU, or FLOPs at a measured MFU) + exposed communication.
A collective over g ranks of a buffer of S bytes (ring algorithms, nccl-tests' bus-bandwidth convention):
    all-reduce       2 (g-1)/g * S / B  +  2 (g-1) * alpha
    all-gather / RS    (g-1)/g * S / B  +    (g-1) * alpha
B is the bus bandwidth of the slowest link the ring crosses: NVLink inside one node, a GPU's share of the
node's EFA otherwise (every GPU drives its own NICs on P5). alpha is a per-hop latency: a ring over m nodes of
8 GPUs crosses m EFA hops and g - m NVLink hops, so alpha is their average.

Overlap: forward is 1/3 and backward 2/3 of compute (backward = 2 x forward in FLOPs). Communication that a
strategy issues during a pass hides behind that pass with efficiency `eta` (the share of the pass it can
overlap); what does not fit, and always the last bucket or block of a pass, is exposed. Collectives issued
outside any pass (ZeRO-1's reduction at the accumulation boundary, ZeRO-1/2's parameter all-gather after the
optimizer step) are fully exposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from seiscli.recipe import Recipe

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp2", "hsdp")
PRETRAIN_MFU = 0.454  # BENCHMARKS.md: pretrain recipe on one H200, 1.720 s/step, 45.4 % MFU (cuDNN attention)
PEAK_BF16 = 989e12
# The measurements the model can be checked against on GPUs (BENCHMARKS.md, "Strategies on 2 GPUs (H200)",
# machine B, 2026-11-30): the pretrain model at micro-batch 1, one GPU and each strategy on two over NVLink.
H200X2_MEASURED: dict[str, object] = {
    "params": 334_354_432,
    "one_gpu_s": 1.732,
    "two_gpu_s": {"ddp": 1.754, "zero1": 1.752, "zero2": 1.749, "zero3": 1.797, "fsdp2": 1.799},
}


@dataclass(frozen=True)
class Network:
    """P5 (8 x H100/H200 per node) by default. Bandwidths are bus bandwidths in bytes/s per GPU."""

    gpus_per_node: int = 8
    nvlink_bw: float = 360e9  # NVLink 4 (450 GB/s per direction); ~360 GB/s all-reduce busbw is what NCCL reaches
    efa_node_bw: float = 3200e9 / 8  # 3,200 Gbps of EFA per node = 400 GB/s, i.e. 50 GB/s per GPU
    efa_efficiency: float = 0.8  # share of EFA line rate a large NCCL ring reaches (assumed)
    nvlink_alpha: float = 2e-6  # seconds per NVLink hop
    efa_alpha: float = 15e-6  # seconds per EFA hop (SRD, through the NIC)

    def bandwidth(self, nodes: int) -> float:
        if nodes <= 1:
            return self.nvlink_bw
        return min(self.nvlink_bw, self.efa_node_bw * self.efa_efficiency / self.gpus_per_node)

    def alpha(self, ranks: int, nodes: int) -> float:
        if ranks <= 1:
            return 0.0
        cross = nodes if nodes > 1 else 0
        return (cross * self.efa_alpha + (ranks - cross) * self.nvlink_alpha) / ranks


@dataclass(frozen=True)
class Measured:
    """A single-level network measured by the sweep's collective benchmark (busbw in bytes/s)."""

    all_reduce_bw: float
    all_gather_bw: float
    alpha: float = 50e-6  # loopback TCP (gloo); the benchmark uses buffers large enough for bandwidth to dominate

    def bandwidth(self, nodes: int) -> float:
        """The measurement is of this allocation, whatever the node count."""
        return self.all_reduce_bw

    def gather_bandwidth(self) -> float:
        return self.all_gather_bw


# Share of a pass that a strategy's collectives can hide behind (see the module docstring).
ETA: dict[str, float] = {
    "ddp": 0.9,  # bucketed all-reduce launched by autograd hooks as buckets fill
    "zero1": 0.0,  # DeepSpeed stage 1 reduces at the accumulation boundary, after backward
    "zero2": 0.8,  # overlap_comm: bucketed reduce-scatter during backward
    "zero3": 0.5,  # per-submodule fetches, synchronous once the prefetch bucket runs dry
    "fsdp2": 0.9,  # per-block all-gather prefetch and reduce-scatter on their own streams
    "hsdp": 0.9,
}
# ZeRO-3 fetches parameters per submodule from Python hooks: a fixed cost per fetch that nothing hides
# (assumed; DeepSpeed's coordinator waits on each fetch). Six parameterised submodules per block, two passes.
ZERO3_FETCH_S = 100e-6
SUBMODULES_PER_BLOCK = 6


@dataclass(frozen=True)
class ModelSizes:
    params: int
    blocks: int  # transformer blocks (encoder + decoder): FSDP's units, ZeRO-3's fetch granularity
    train_flops_per_sample: float


def model_sizes(recipe: Recipe) -> ModelSizes:
    """Parameter count and model FLOPs of one sample (the formula of seiscli/train/flops.py, restated here
    because the launcher does not import the trainer)."""
    m = recipe.model
    k = m.in_chans * m.patch_size**3
    n = recipe.num_tokens
    v = recipe.visible_tokens

    def block_params(d: int) -> int:
        h = int(d * m.mlp_ratio)
        return 4 * d * d + 4 * d + 2 * d * h + h + d + 4 * d  # qkv+proj, mlp, two norms

    de, dd = m.encoder_dim, m.decoder_dim
    params = (
        k * de + de + de  # patch embed, cls token
        + m.encoder_depth * block_params(de) + 2 * de
        + de * dd + dd + dd  # decoder embed, mask token
        + m.decoder_depth * block_params(dd) + 2 * dd
        + dd * k + k
    )  # fmt: skip

    def lin(seq: int, d: int) -> int:
        return 2 * seq * (4 * d * d + 2 * d * int(d * m.mlp_ratio))

    se, sd = v + 1, n
    fwd = (
        m.encoder_depth * (lin(se, de) + 4 * se * se * de)
        + m.decoder_depth * (lin(sd, dd) + 4 * sd * sd * dd)
        + 2 * v * k * de + 2 * v * de * dd + 2 * (n - v) * dd * k
    )  # fmt: skip
    return ModelSizes(params=params, blocks=m.encoder_depth + m.decoder_depth, train_flops_per_sample=3.0 * fwd)


def gpu_compute_s(recipe: Recipe, mfu: float = PRETRAIN_MFU, peak: float = PEAK_BF16) -> float:
    """One GPU's compute per optimizer step: FLOPs of its samples at the measured MFU."""
    per_gpu = recipe.train.micro_batch * recipe.train.grad_accum
    return model_sizes(recipe).train_flops_per_sample * per_gpu / (peak * mfu)


@dataclass
class Prediction:
    strategy: str
    nodes: int
    gpus: int
    compute_s: float
    comm_s: float  # all communication time, overlapped or not
    exposed_s: float
    step_s: float = field(init=False)
    efficiency: float | None = None

    def __post_init__(self) -> None:
        self.step_s = self.compute_s + self.exposed_s


def _coll(kind: str, nbytes: float, ranks: int, bw: float, alpha: float) -> float:
    if ranks <= 1:
        return 0.0
    factor = 2.0 if kind == "all_reduce" else 1.0
    return factor * (ranks - 1) / ranks * nbytes / bw + factor * (ranks - 1) * alpha


def predict_step(
    strategy: str,
    sizes: ModelSizes,
    compute_s: float,
    nodes: int,
    procs_per_node: int,
    net: Network | Measured,
    *,
    bucket_bytes: float = 25e6,
) -> Prediction:
    """Step time of `strategy` at `nodes` x `procs_per_node` ranks; `compute_s` is one rank's comm-free step."""
    g = nodes * procs_per_node
    bw = net.bandwidth(nodes)
    gbw = net.gather_bandwidth() if isinstance(net, Measured) else bw
    a = net.alpha if isinstance(net, Measured) else net.alpha(g, nodes)
    p = sizes.params
    fwd, bwd = compute_s / 3, 2 * compute_s / 3
    eta = ETA[strategy]
    if g <= 1:
        return Prediction(strategy, nodes, g, compute_s, 0.0, 0.0)

    def hidden(comm: float, window: float, tail: float) -> float:
        """Exposed part of `comm` issued during a pass of length `window`; at least its last piece."""
        return max(comm - eta * window, min(comm, tail))

    if strategy == "ddp":  # fp32 gradients, all-reduced in 25 MB buckets during backward
        total = _coll("all_reduce", 4 * p, g, bw, a)
        calls = math.ceil(4 * p / bucket_bytes)
        exposed = hidden(total, bwd, total / calls)
    elif strategy in ("zero1", "zero2"):  # bf16 gradients reduce-scattered, bf16 parameters all-gathered after
        rs = _coll("reduce_scatter", 2 * p, g, bw, a)
        ag = _coll("all_gather", 2 * p, g, gbw, a)
        total = rs + ag
        exposed = ag + (rs if strategy == "zero1" else hidden(rs, bwd, rs / max(1, math.ceil(2 * p / bucket_bytes))))
    elif strategy in ("zero3", "fsdp2"):  # parameters gathered in forward and again in backward, bf16
        ag = _coll("all_gather", 2 * p, g, gbw, a)
        grad_bytes = 2 if strategy == "zero3" else 4  # fsdp2's reduce dtype is fp32 (seiscli/train/parallel/fsdp2.py)
        rs = _coll("reduce_scatter", grad_bytes * p, g, bw, a)
        total = 2 * ag + rs
        per_block = 1 / sizes.blocks
        exposed = hidden(ag, fwd, ag * per_block) + hidden(ag + rs, bwd, (ag + rs) * per_block)
        if strategy == "zero3":
            fetches = 2 * sizes.blocks * SUBMODULES_PER_BLOCK * ZERO3_FETCH_S
            total, exposed = total + fetches, exposed + fetches
    elif strategy == "hsdp":  # fsdp2 sharded inside a node, gradient shards all-reduced across nodes
        local = procs_per_node
        ib, ia = (net.bandwidth(1), net.alpha(local, 1)) if isinstance(net, Network) else (bw, a)
        ag = _coll("all_gather", 2 * p, local, ib, ia)
        rs = _coll("reduce_scatter", 4 * p, local, ib, ia)
        ar = _coll("all_reduce", 4 * p / local, nodes, bw, net.alpha(nodes, nodes) if isinstance(net, Network) else a)
        total = 2 * ag + rs + ar
        per_block = 1 / sizes.blocks
        exposed = hidden(ag, fwd, ag * per_block) + hidden(ag + rs + ar, bwd, (ag + rs + ar) * per_block)
    else:
        raise ValueError(f"strategy {strategy!r}: allowed {', '.join(STRATEGIES)}")
    return Prediction(strategy, nodes, g, compute_s, total, exposed)


def predict_table(
    recipe: Recipe,
    counts: list[int],
    *,
    compute_s: float | None = None,
    net: Network | None = None,
    strategies: tuple[str, ...] = STRATEGIES,
) -> dict[str, list[Prediction]]:
    """Per strategy, a prediction per node count; efficiency relative to the smallest count (weak scaling)."""
    net = net or Network(gpus_per_node=recipe.cluster.gpus_per_node or 8)
    sizes = model_sizes(recipe)
    c = gpu_compute_s(recipe) if compute_s is None else compute_s
    out: dict[str, list[Prediction]] = {}
    for s in strategies:
        rows = [predict_step(s, sizes, c, n, net.gpus_per_node, net) for n in counts]
        base = rows[0].step_s
        for r in rows:
            r.efficiency = base / r.step_s
        out[s] = rows
    return out


def solve_compute(target: float, metric: object, lo: float = 1e-5, hi: float = 100.0) -> float | None:
    """The compute step time at which `metric(compute_s)` (increasing in compute_s) reaches `target`, by
    bisection on a log scale; None when it cannot within [lo, hi]."""
    f = metric  # type: ignore[assignment]
    if not f(lo) <= target <= f(hi):  # type: ignore[operator]
        return None
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if f(mid) < target:  # type: ignore[operator]
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def published_check(recipe: Recipe, nodes: int = 16, net: Network | None = None) -> dict[str, float | None]:
    """What the model needs to reproduce the published TGS figures on 128 GPUs (ZeRO-2 1,974, FSDP2 1,833,
    ZeRO-3 869 samples/s; 90-95 % efficiency from 1 to 16 nodes) with this recipe's model sizes: the compute
    step time at which each ratio or efficiency comes out, to set against this recipe's own."""
    net = net or Network()
    sizes = model_sizes(recipe)
    g = net.gpus_per_node

    def step(s: str, c: float, n: int = nodes) -> float:
        return predict_step(s, sizes, c, n, g, net).step_s

    return {
        "compute_s_recipe": gpu_compute_s(recipe),
        "zero3_over_zero2_0.44": solve_compute(869 / 1974, lambda c: step("zero2", c) / step("zero3", c)),
        "fsdp2_over_zero2_0.93": solve_compute(1833 / 1974, lambda c: step("zero2", c) / step("fsdp2", c)),
        "zero2_efficiency_0.90": solve_compute(0.90, lambda c: step("zero2", c, 1) / step("zero2", c)),
        "zero2_efficiency_0.95": solve_compute(0.95, lambda c: step("zero2", c, 1) / step("zero2", c)),
    }
