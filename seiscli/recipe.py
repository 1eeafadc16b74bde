"""The recipe: one typed object that the launcher renders and the trainer runs.

This module is the only thing the launcher and the trainer share. It imports nothing heavy
(pydantic and yaml only), so every CLI command can load and validate recipes fast.
"""

from __future__ import annotations

import re
import sys
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


def _shipped_root() -> Path:
    """Where the shipped recipes, templates and cluster profiles live: the repository root next to the package
    (a checkout or editable install), else <prefix>/share/seis where a plain `pip install .` puts them."""
    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "templates").is_dir() else Path(sys.prefix) / "share" / "seis"


PROJECT_ROOT = _shipped_root()
RECIPES_DIR = PROJECT_ROOT / "recipes"

Strategy = Literal["ddp", "zero1", "zero2", "zero3", "fsdp2"]
Backend = Literal["local", "slurm", "hyperpod-slurm", "hyperpod-eks"]
Precision = Literal["bf16", "fp32"]
Attention = Literal["auto", "cudnn", "flash", "efficient", "math"]
Checkpointing = Literal["none", "full", "save_attention"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


def tokens_per_stratum(n_tokens: int, mask_ratio: Fraction, strata: int) -> int:
    """Encoder tokens T per mask stratum (cls included) so that V = T*K - 1 visible patches is nearest to
    N*(1 - r), exactly; shared by the trainer's masking plan and the launcher's FLOP estimate."""
    target = n_tokens * (1 - mask_ratio)
    if 2 * (target + 1) < strata:  # the nearest T would be 0: every stratum needs an encoder token
        raise ValueError(
            f"mask ratio {float(mask_ratio)} leaves too few visible patches out of {n_tokens} for {strata} mask "
            f"strata (at least {strata - 1})"
        )
    lo = floor((target + 1) / strata)
    candidates = {min(max(t, 1), n_tokens // strata) for t in (lo, lo + 1)}
    return min(candidates, key=lambda t: (abs(t * strata - 1 - target), t))


class RecipeError(ValueError):
    """A recipe problem, phrased as one line that names the field and what is allowed."""


# Recipes and profiles are untrusted input. A few lines of YAML aliases can expand into billions of nodes
# (the "billion laughs" shape) and hang the loader, so aliases are refused outright: no recipe needs them,
# and refusing is simpler to reason about than bounding the expansion. The size cap bounds parse time.
MAX_YAML_BYTES = 1 << 20
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str, source: str) -> Any:
    """Parse untrusted YAML: one line `source: reason` (a RecipeError) for anything refused or malformed."""
    if len(text.encode()) > MAX_YAML_BYTES:
        raise RecipeError(f"{source}: {len(text.encode()):,} bytes; at most {MAX_YAML_BYTES:,} are read")
    try:
        for event in yaml.parse(text, Loader=_YamlLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1
                raise RecipeError(
                    f"{source}: line {line}: YAML alias *{event.anchor} is not allowed; write the value out"
                )
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Eks(_Section):
    """Where a hyperpod-eks job goes; ignored by the other backends."""

    namespace: str = Field("default", min_length=1, max_length=63, description="Kubernetes namespace of the job")
    context: str | None = Field(None, description="kubeconfig context; default: the current one")
    service_account: str | None = None
    queue: str | None = Field(None, description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
    priority: str | None = Field(None, description="Kueue WorkloadPriorityClass")
    shared_pvc: str | None = Field(None, description="PersistentVolumeClaim of cluster.shared_dir")
    max_retries: int = Field(10, ge=0, le=1000, description="job restarts the HyperPod training operator may make")


class Cluster(_Section):
    backend: Backend = "local"
    nodes: int = Field(1, ge=1, le=4096)
    gpus_per_node: int = Field(8, ge=0, le=64, description="0 runs on CPU")
    cpu_procs_per_node: int = Field(2, ge=1, le=256, description="processes per node when gpus_per_node is 0")
    cpus_per_task: int | None = Field(None, ge=1)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_limit: str = "01:00:00"
    container_image: str | None = None
    container_mounts: list[str] = []
    python: str = Field(
        "python3", description="interpreter of the trainer on the nodes; local backend: python3 = seis's own"
    )
    env: dict[str, str] = {}
    extra_sbatch: list[str] = []
    signal_seconds: int = Field(300, ge=10, description="warning before time limit or preemption")
    requeue: bool = True
    max_retries: int = Field(
        3, ge=0, le=100, description="requeues after a failure a restart can cure (run_layout.RETRY_CODES)"
    )
    profile: str | None = Field(None, description="the cluster profile applied (seis --cluster NAME)")
    shared_dir: str | None = Field(None, description="filesystem every node mounts, e.g. /fsx")
    local_dir: str | None = Field(None, description="node-local scratch, e.g. /opt/dlami/nvme")
    instance_type: str | None = None
    efa_per_node: int = Field(0, ge=0, le=64, description="EFA interfaces per node (hyperpod-eks requests them)")
    auto_resume: bool = Field(True, description="HyperPod: rerun the step on replaced nodes after a hardware fault")
    eks: Eks = Eks()

    @field_validator("time_limit")
    @classmethod
    def _time(cls, v: str) -> str:
        if not re.fullmatch(r"\d+-\d{1,2}(:\d{2}){0,2}|\d+(:\d{2}){0,2}", v):
            raise ValueError("must be minutes, HH:MM:SS or D-HH:MM:SS")
        return v

    @property
    def time_limit_s(self) -> int:
        """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
        days, _, rest = self.time_limit.rpartition("-")
        parts = [int(x) for x in rest.split(":")]
        if days:
            h, m, sec = [*parts, 0, 0][:3]
            return ((int(days) * 24 + h) * 60 + m) * 60 + sec
        if len(parts) == 3:
            return (parts[0] * 60 + parts[1]) * 60 + parts[2]
        return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)

    @model_validator(mode="after")
    def _signal_before_limit(self) -> Cluster:
        if self.time_limit_s <= self.signal_seconds:
            raise ValueError(
                f"cluster.time_limit={self.time_limit} ({self.time_limit_s}s) must be longer than "
                f"cluster.signal_seconds={self.signal_seconds}: the checkpoint warning would fire at start"
            )
        return self

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ValueError(f"{k!r} is not a valid environment variable name")
        return v

    @property
    def procs_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.cpu_procs_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class Model(_Section):
    patch_size: int = Field(16, ge=1)
    in_chans: int = Field(1, ge=1)
    encoder_depth: int = Field(24, ge=1)
    encoder_dim: int = Field(1024, ge=6)
    encoder_heads: int = Field(16, ge=1)
    decoder_depth: int = Field(8, ge=1)
    decoder_dim: int = Field(512, ge=6)
    decoder_heads: int = Field(8, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = True
    attention: Attention = "auto"

    @model_validator(mode="after")
    def _heads(self) -> Model:
        for part in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{part}_dim"), getattr(self, f"{part}_heads")
            if dim % heads:
                raise ValueError(f"{part}_dim={dim} is not divisible by {part}_heads={heads}")
            if dim % 2:
                raise ValueError(f"{part}_dim={dim} must be even (3D sin-cos position embedding)")
        return self


class Data(_Section):
    source: Literal["synthetic", "mdio"] = "synthetic"
    uris: list[str] = []
    crop: tuple[int, int, int] = (640, 640, 1024)
    synth_shape: tuple[int, int, int] = (128, 128, 256)
    normalization: Literal["zscore", "none"] = "zscore"
    clip: float = Field(4.0, gt=0)
    min_live_fraction: float = Field(0.5, ge=0, le=1)
    flips: bool = True
    align_crops: bool = Field(
        False,
        description="crop origins snap to the volume's chunk grid, so a crop reads only the chunks it covers: "
        "fewer distinct origins, no read amplification; the crop must be a multiple of the chunk shape "
        "(checked when the volumes are opened)",
    )
    workers: int = Field(2, ge=0)
    prefetch: int = Field(2, ge=1)
    lookahead: bool | None = Field(
        None,
        description="a thread copies the next batch to the device while the current step runs; unset = on for "
        "CUDA with workers; false is the A/B switch for step-time spikes (issue 13)",
    )
    concurrency: int = Field(32, ge=1, description="chunk GETs in flight per loader process (worker)")
    retries: int = Field(10, ge=1, le=100, description="tries per chunk GET, the first included, with backoff")
    max_volume_failures: int = Field(3, ge=1, description="failed crop reads in a row before a volume is dropped")
    s3_client: Literal["obstore", "s3fs"] = Field("obstore", description="client for s3:// volumes")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; credentials: standard AWS chain")
    region: str | None = None
    holdout_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="the last fraction of inlines of every volume, reserved for evaluation: training never "
        "draws a crop there (see seiscli/data/split.py); 0 reserves nothing",
    )

    @field_validator("crop", "synth_shape")
    @classmethod
    def _positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if min(v) < 1:
            raise ValueError("every axis must be >= 1")
        return v


class Parallelism(_Section):
    strategy: Strategy = "zero2"
    cp: int = Field(1, ge=1, description="context-parallel degree")
    activation_checkpointing: Checkpointing = Field(
        "none", description="none | full (recompute each block) | save_attention (keep attention outputs)"
    )
    compile: bool = False
    fsdp_shard_size: int | None = Field(
        None, ge=1, description="fsdp2: shard over groups of this many consecutive ranks, replicate across groups"
    )
    reduce_bucket_size: int = Field(50_000_000, ge=1)
    allgather_bucket_size: int = Field(200_000_000, ge=1)

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _ac_bool(cls, v: Any) -> Any:
        # Older recipes say true/false.
        return {True: "full", False: "none"}.get(v, v) if isinstance(v, bool) else v


class Optim(_Section):
    lr: float = Field(1.5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")


class Train(_Section):
    steps: int = Field(1000, ge=1)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    global_batch: int | None = Field(None, ge=1, description="checked against micro x accum x dp")
    precision: Precision = "bf16"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads per process")


class Checkpoint(_Section):
    dir: str | None = Field(None, description="a path every node mounts; default <run dir>/checkpoints")
    interval: int = Field(500, ge=0, description="steps between saves; 0 = only on signal and at the end")
    keep: int = Field(3, ge=1)
    save_timeout_s: int = Field(
        600, ge=10, description="a save not finished on every rank by then stops the job (exit 1), not the GPUs idle"
    )

    @field_validator("dir")
    @classmethod
    def _filesystem(cls, v: str | None) -> str | None:
        if v and "://" in v:
            raise ValueError(
                f"{v!r}: object-store checkpoints (s3://) are not supported by this trainer yet; allowed: a path "
                "on a filesystem every node mounts (e.g. under cluster.shared_dir), or empty for <run dir>/checkpoints"
            )
        return v


class Wandb(_Section):
    project: str = Field(..., min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"  # offline: files under <run dir>/wandb, `wandb sync` later


class Mlflow(_Section):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else a file store in <run dir>/mlruns
    experiment: str = "seis"


class Logging(_Section):
    interval: int = Field(10, ge=1)
    # Extra viewers, written by rank 0 beside metrics.jsonl (which stays what seis itself reads).
    # tensorboard: None = where the package is installed, true = required (exit 2 without it), false = off.
    tensorboard: bool | None = None
    wandb: Wandb | None = None  # set to log to Weights & Biases (the `viewers` extra on the nodes)
    mlflow: Mlflow | None = None  # set to log to MLflow (the `viewers` extra on the nodes)


class Eval(_Section):
    """Held-out evaluation (`seis eval`, and periodically while training)."""

    interval: int = Field(0, ge=0, description="steps between held-out reconstruction evals in training; 0 = off")
    samples: int = Field(8, ge=1, description="held-out crops per reconstruction eval")
    seed: int = Field(0, description="draws the held-out crops and their masks: every checkpoint sees the same")
    # The fault probe of `seis eval` (QUALITY.md): with 8 crops it was data-starved on the smoke model (below
    # calling every voxel a fault); from 32 crops up the trained encoder beat the random one and raw voxels.
    probe_crops: int = Field(
        64, ge=0, description="crops to fit the fault probe on, and as many to test it on; 0 = off"
    )
    probe_steps: int = Field(300, ge=1, description="Adam steps fitting the fault probe")


class Recipe(_Section):
    name: str = Field(..., min_length=1, max_length=128)
    description: str = ""
    cluster: Cluster = Cluster()
    model: Model = Model()
    data: Data = Data()
    parallelism: Parallelism = Parallelism()
    optim: Optim = Optim()
    train: Train = Train()
    checkpoint: Checkpoint = Checkpoint()
    logging: Logging = Logging()
    eval: Eval = Eval()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' (it names the run directory)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        p = self.model.patch_size
        bad = [c for c in self.data.crop if c % p]
        if bad:
            raise ValueError(
                f"data.crop {tuple(self.data.crop)} is not divisible by model.patch_size={p} on every axis; "
                f"nearest valid: {tuple(max(p, round(c / p) * p) for c in self.data.crop)}"
            )
        cp, world = self.parallelism.cp, self.cluster.world_size
        if world % cp:
            raise ValueError(f"parallelism.cp={cp} does not divide the world size {world} (nodes x procs per node)")
        if cp > 1 and self.parallelism.strategy.startswith("zero"):
            # DeepSpeed would need its sequence-parallel mpu (sum over cp, average over dp); not wired.
            raise ValueError(
                f"parallelism.cp={cp} with parallelism.strategy={self.parallelism.strategy}: context parallelism "
                "runs with strategy fsdp2 or ddp; allowed with zero1/zero2/zero3: parallelism.cp=1"
            )
        self._check_shard_size(cp, world)
        if self.eval.interval and not self.data.holdout_fraction:
            raise ValueError(
                f"eval.interval={self.eval.interval} but data.holdout_fraction=0 reserves no held-out region; "
                "allowed: a data.holdout_fraction in (0, 1), or eval.interval=0"
            )
        on_cpu = self.train.device == "cpu" or self.cluster.gpus_per_node == 0
        if cp > 1 and on_cpu and self.model.attention in ("flash", "cudnn"):
            # Ring attention's flash/cudnn block kernels are aten's CUDA ones (the CPU flash kernel is "auto").
            raise ValueError(
                f"model.attention={self.model.attention!r} with parallelism.cp={cp} on CPU (cluster.gpus_per_node="
                f"{self.cluster.gpus_per_node}, train.device={self.train.device}): ring attention's "
                f"{self.model.attention} kernel needs CUDA; allowed on CPU with cp > 1: auto or math"
            )
        n = self.num_tokens
        if n % cp:
            raise ValueError(f"the crop's {n} tokens do not split over parallelism.cp={cp}")
        if self.train.global_batch is not None and self.train.global_batch != self.global_batch:
            raise ValueError(
                f"train.global_batch={self.train.global_batch} != micro_batch {self.train.micro_batch} x "
                f"grad_accum {self.train.grad_accum} x data-parallel size {self.dp} = {self.global_batch}"
            )
        if self.data.source == "mdio" and not self.data.uris:
            raise ValueError("data.uris is empty but data.source is 'mdio'")
        if self.data.source == "synthetic" and any(
            s < c for s, c in zip(self.data.synth_shape, self.data.crop, strict=True)
        ):
            raise ValueError(f"data.synth_shape {self.data.synth_shape} is smaller than data.crop {self.data.crop}")
        return self

    def _check_shard_size(self, cp: int, world: int) -> None:
        n, strategy = self.parallelism.fsdp_shard_size, self.parallelism.strategy
        if n is None:
            return
        if strategy != "fsdp2":
            raise ValueError(
                f"parallelism.fsdp_shard_size={n} with parallelism.strategy={strategy}: hybrid sharding is an "
                "fsdp2 mesh; allowed: strategy fsdp2, or no fsdp_shard_size"
            )
        if world % n:
            raise ValueError(
                f"parallelism.fsdp_shard_size={n} does not divide the world size {world}; allowed: a divisor of it"
            )
        if n % cp:
            # The gradient is the SUM over all ranks either way; this keeps a cp group (consecutive ranks) inside
            # one shard group, so with shard size = GPUs per node its ring and the per-layer collectives share a node.
            raise ValueError(
                f"parallelism.fsdp_shard_size={n} is not a multiple of parallelism.cp={cp}; allowed: a multiple "
                f"of cp that divides the world size {world}"
            )

    @property
    def grid(self) -> tuple[int, int, int]:
        p = self.model.patch_size
        return (self.data.crop[0] // p, self.data.crop[1] // p, self.data.crop[2] // p)

    @property
    def num_tokens(self) -> int:
        g = self.grid
        return g[0] * g[1] * g[2]

    @property
    def visible_tokens(self) -> int:
        """Patches the encoder sees per sample (without the cls token): the masking plan's V, one mask stratum
        per z patch plane (seiscli/train/model/plan_for)."""
        gz = self.grid[0]
        return tokens_per_stratum(self.num_tokens, Fraction(str(self.model.mask_ratio)), gz) * gz - 1

    @property
    def dp(self) -> int:
        return self.cluster.world_size // self.parallelism.cp

    @property
    def global_batch(self) -> int:
        return self.train.micro_batch * self.train.grad_accum * self.dp

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def find_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a shipped recipe (`pretrain` -> recipes/pretrain.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"recipe file {name_or_path!r} does not exist")
        return p
    for root in (Path.cwd() / "recipes", RECIPES_DIR):
        cand = root / f"{name_or_path}.yaml"
        if cand.is_file():
            return cand
    raise RecipeError(f"no recipe named {name_or_path!r}; shipped recipes: {', '.join(list_recipes()) or 'none'}")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe_dict(name_or_path: str) -> dict[str, Any]:
    path = find_recipe(name_or_path)
    data = load_yaml(path.read_text(), str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, got {type(data).__name__}")
    return data


def _section_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    ann = model.model_fields[key].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe dict's leaves by dotted path (`train.steps`), the form overrides use."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c` in a recipe dict, refusing paths the schema does not have."""
    keys = dotted.split(".")
    model: type[BaseModel] | None = Recipe
    node = data
    for i, key in enumerate(keys):
        where = ".".join(keys[: i + 1])
        if model is None:  # inside a free-form mapping such as cluster.env
            if i != len(keys) - 1:
                raise RecipeError(f"override {dotted!r}: {'.'.join(keys[:i])} holds plain values, not sections")
        elif key not in model.model_fields:
            allowed = ", ".join(model.model_fields)
            raise RecipeError(f"override {dotted!r}: unknown field {where!r}; allowed: {allowed}")
        if i == len(keys) - 1:
            node[key] = value
            return
        sub = _section_model(model, key) if model else None
        if sub is None and model is not None and model.model_fields[key].annotation not in (dict[str, str],):
            raise RecipeError(f"override {dotted!r}: {where!r} is a value, not a section")
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {dotted!r}: {where!r} is not a mapping in the recipe")
        model = sub


def parse_set(item: str) -> tuple[str, Any]:
    """`model.depth=24` -> ('model.depth', 24); the value is read as YAML so types come out right."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. model.encoder_depth=24")
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    except RecipeError:  # not plain YAML (or an alias, as in a glob `*.mdio`): the text itself, never expanded
        value = raw
    return key.strip(), value


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Recipe
        for key in err["loc"][:-1]:
            model = _section_model(model, str(key)) or model
        return f"unknown field {loc!r}; allowed: {', '.join(model.model_fields)}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"field {loc!r}: {msg}{shown}" if loc else msg


def validate(data: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError("; ".join(_describe(err) for err in e.errors())) from None


def load_recipe(name_or_path: str, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe, apply dotted overrides (`{"cluster.nodes": 16}`), validate once at the end."""
    data = read_recipe_dict(name_or_path)
    for key, value in (overrides or {}).items():
        set_path(data, key, value)
    return validate(data)
