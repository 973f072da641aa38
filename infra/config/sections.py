"""The typed sections of the training loop's config: every key the loop reads, its type, its
default and its checks, in one place (`infra.section` is the mechanism; a model declares its
`model.*` keys in its own module, a task its `data.*` keys).

Each part of the stack takes its own section, typed: `make_optimizer(OptimConfig)`,
`make_mesh(MeshConfig)`, the checkpointer its `CheckpointConfig`, ... (`X.from_config(config.x)`
also accepts the untyped `ConfigDict` section and checks it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from ml_collections import ConfigDict

from infra.errors import ConfigError
from infra.section import Section

# Logical axis -> mesh axes. Batch is split over every data-parallel axis (`expert` and `stage`
# too: outside the experts and the pipelined layers they are data parallelism) and `length` over
# `sequence` (sequence parallelism, a no-op while that axis has size 1); weights are split over
# `fsdp` along `embed`, over `tensor` along heads / mlp / vocab (Megatron style), over `expert`
# along the experts and over `stage` along the stacked layers (pipeline stages). `act_*` names
# are activation dimensions (the model pins them with `infra.sharding.constrain`). Names that only
# one task's models use (image patches, embedding-table rows, forecast windows) are that task's
# `logical_rules`, appended after these (`infra.tasks.logical_rules`).
DEFAULT_RULES = (
    ("batch", ("data", "stage", "fsdp", "expert")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", "stage"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Named parallelism layouts: mesh sizes (-1 = the remaining devices) on top of DEFAULT_RULES.
# `--config.sharding.preset=fsdp_tp`; an explicit `--config.mesh.<axis>=N` still wins.
PRESETS = {
    "dp": dict(data=-1, fsdp=1, sequence=1, tensor=1),
    "fsdp": dict(data=1, fsdp=-1, sequence=1, tensor=1),
    "tp": dict(data=1, fsdp=1, sequence=1, tensor=-1),
    "dp_fsdp": dict(data=2, fsdp=-1, sequence=1, tensor=1),
    "fsdp_tp": dict(data=1, fsdp=-1, sequence=1, tensor=2),
    "dp_fsdp_tp": dict(data=2, fsdp=-1, sequence=1, tensor=2),
    "dp_sp": dict(data=-1, fsdp=1, sequence=2, tensor=1),
    "fsdp_sp": dict(data=1, fsdp=-1, sequence=2, tensor=1),
    "fsdp_tp_sp": dict(data=1, fsdp=-1, sequence=2, tensor=2),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    prefix: ClassVar[str] = "train"

    steps: int = 1000
    batch_size: int = 32
    microbatches: int = 1  # gradient accumulation: the batch is split into this many
    seed: int = 0
    eval_every: int = 200
    log_every: int = 20
    stop_at: int = 0  # stop (with a checkpoint) at this step, schedule unchanged; 0 = steps
    eval_at_start: bool = True
    nonfinite: str = "stop"  # NaN/Inf loss or gradients: "stop" (exit 4) or "skip" the update
    progress_bar: bool = True
    # after SIGTERM the run checkpoints and stops; if it has not within this many seconds
    # (stuck in a hung write, say) it exits anyway (code 143)
    sigterm_grace_s: float = 120.0

    def validate(self) -> None:
        self.positive("steps", "batch_size", "log_every", "microbatches", "eval_every",
                      "sigterm_grace_s")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite must be 'stop' or 'skip', got '{self.nonfinite}'")
        self.non_negative("seed")
        self.non_negative("stop_at", " (0 = run to train.steps)")


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    prefix: ClassVar[str] = "optim"
    float32: ClassVar[bool] = True  # the schedule and updates are computed in float32

    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8

    def validate(self) -> None:
        self.positive("lr")
        self.non_negative("warmup_steps")
        self.in_range("b1", 0, 1, high_open=True)
        self.in_range("b2", 0, 1, high_open=True)
        self.positive("eps")
        self.in_range("min_lr_ratio", 0, 1)
        self.non_negative("weight_decay")
        self.non_negative("grad_clip", " (0 = no clipping)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    prefix: ClassVar[str] = "checkpoint"

    every: int = 500  # steps between saves
    every_seconds: float = 0.0  # also save when this much time has passed (0 = off)
    keep: int = 3
    async_save: bool = True
    # async saves copy the state on its devices and return (one more state of device memory
    # while Orbax reads the copy in the background); false: save() waits for Orbax's
    # device-to-host transfer instead
    device_copy: bool = True
    fallback: bool = True  # a corrupted latest checkpoint: warn and use the previous one
    # gs:// workdirs: a failed request is retried this often (backoff 1 s -> 32 s, about 15
    # minutes in all by default) before the save fails with exit 3
    storage_retries: int = 32

    def validate(self) -> None:
        self.positive("every", "keep")
        self.non_negative("every_seconds", " (0 = off)")
        self.non_negative("storage_retries")


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Mesh sizes: within a slice / host (ICI) and across slices (DCN); -1 = the rest."""

    prefix: ClassVar[str] = "mesh"

    data: int = -1
    stage: int = 1  # pipeline stages (infra/models/pipeline.py)
    fsdp: int = 1
    sequence: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_stage: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    def __post_init__(self) -> None:  # the axis's own message, before the generic type check
        for axis, size in self.to_dict().items():
            if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
                raise ConfigError(f"mesh.{axis} must be a positive int or -1 (fill), got {size}")
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Section):
    prefix: ClassVar[str] = "distributed"

    # "auto": initialise when the environment shows several processes (TPU pod, Slurm, explicit
    # coordinator); "always" / "never" force it.
    initialize: str = "auto"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    # a process that stops answering is declared dead after this long; the others exit
    heartbeat_timeout_s: float = 30

    def validate(self) -> None:
        if self.initialize not in ("auto", "always", "never"):
            raise ConfigError(f"distributed.initialize must be auto, always or never, got "
                              f"'{self.initialize}'")


@dataclasses.dataclass(frozen=True)
class ShardingConfig(Section):
    prefix: ClassVar[str] = "sharding"

    preset: str = ""  # one of PRESETS; sets mesh.* sizes
    rules: tuple = DEFAULT_RULES
    warn_replicated_mb: float = 16.0  # warn about replicated params larger than this
    print_table: bool = True

    def validate(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(
                f"unknown sharding.preset '{self.preset}'; known presets: {', '.join(PRESETS)}",
                key="sharding.preset", value="fsdp", verb="set e.g.",
                note=", or leave it empty and set the mesh.* sizes yourself")


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Section):
    """Pipeline parallelism over `mesh.stage` (infra/models/pipeline.py): each step's batch is
    split into `microbatches` that flow through the stages (GPipe); with `repeats` R > 1 every
    stage holds R non-consecutive chunks of layers (circular), shrinking the idle fraction
    (S - 1) / (R * M + S - 1). Ignored while `mesh.stage` is 1."""

    prefix: ClassVar[str] = "pipeline"

    microbatches: int = 0  # M, a multiple of the stages; 0 = as many as the stages
    repeats: int = 1  # R: layer chunks per stage

    def validate(self) -> None:
        self.non_negative("microbatches", " (0 = mesh.stage)")
        self.positive("repeats")


@dataclasses.dataclass(frozen=True)
class InitConfig(Section):
    """Start from another model's parameters (fresh optimizer, step 0): a workdir of ours or a
    Hugging Face model directory; the run then takes its architecture and tokenizer
    (`infra.config.loading.apply_init_from`; the parameters: infra/interop/init_from.py)."""

    prefix: ClassVar[str] = "init"
    renamed: ClassVar[dict[str, str]] = {"from": "from_"}

    from_: str = ""


@dataclasses.dataclass(frozen=True)
class LoraConfig(Section):
    """LoRA (infra/models/lora.py; transformer LM tasks): with `rank` set, every weight whose
    path matches the regex `targets` gets low-rank adapters a, b (b = 0 at the start) and only
    they train; the model computes W x + (alpha / rank) * b(a x). Unset: every parameter trains
    (full fine-tuning)."""

    prefix: ClassVar[str] = "finetune.lora"

    rank: Any = None  # a positive int, or None
    alpha: float = 16.0
    targets: str = "attn/(q|k|v|o)"

    def validate(self) -> None:
        if self.rank is None:
            return
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"finetune.lora.rank must be a positive integer (leave it unset "
                              f"for full fine-tuning), got {self.rank}", key="finetune.lora.rank",
                              value=8)
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"finetune.lora.alpha must be > 0, got {self.alpha}",
                              key="finetune.lora.alpha", value=16.0)

    @property
    def enabled(self) -> bool:
        return self.rank is not None


@dataclasses.dataclass(frozen=True)
class RLConfig(Section):
    """Post-training with rewards or preferences (tasks `grpo` and `dpo`, infra/rl/): GRPO's
    rollouts and objective, and the KL / DPO coefficient `beta`."""

    prefix: ClassVar[str] = "rl"

    rewards: str = ""  # "fn[:weight],...": callables of the experiment file or `module:fn`
    num_generations: int = 8  # completions sampled per prompt (the group)
    num_iterations: int = 1  # updates per rollout batch (importance ratios after the first)
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon]
    beta: float = 0.0  # GRPO: KL penalty to the reference policy; DPO: the loss's beta
    scale_rewards: bool = True  # advantages: (reward - group mean) / group std (else not divided)
    loss_averaging: str = "token"  # "token": mean over all completion tokens; "sequence"
    max_new_tokens: int = 32  # completion length limit
    temperature: float = 1.0  # rollout sampling temperature
    top_k: int = 0  # rollout top-k (0 = all)
    slots: int = 0  # rollout engine slots (0 = every completion of a batch at once)

    def validate(self) -> None:
        self.positive("num_generations", "num_iterations", "max_new_tokens")
        self.non_negative("beta")
        self.non_negative("top_k", " (0 = all)")
        self.non_negative("slots", " (0 = train.batch_size x rl.num_generations)")
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < 1):
            raise ConfigError(f"rl.epsilon must be in (0, 1), got {self.epsilon}",
                              key="rl.epsilon", value=0.2)
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ConfigError(f"rl.temperature must be > 0, got {self.temperature}",
                              key="rl.temperature", value=1.0)
        self.one_of("loss_averaging", ("token", "sequence"))


@dataclasses.dataclass(frozen=True)
class ProfileConfig(Section):
    prefix: ClassVar[str] = "profile"

    steps: tuple[int, ...] = ()  # (first, last): capture a jax.profiler trace of these steps

    def validate(self) -> None:
        if self.steps and (len(self.steps) != 2 or not 0 < self.steps[0] <= self.steps[1]):
            raise ConfigError(
                f"profile.steps must be (first, last) with 0 < first <= last, got {self.steps}",
                key="profile.steps", value="[10,12]", verb="e.g.")


# dotted place in the config -> its section, in the order they are checked
LOOP_SECTIONS: dict[str, type[Section]] = {
    "train": TrainConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "profile": ProfileConfig,
    "mesh": MeshConfig,
    "distributed": DistributedConfig,
    "sharding": ShardingConfig,
    "pipeline": PipelineConfig,
    "init": InitConfig,
    "finetune.lora": LoraConfig,
    "rl": RLConfig,
}


def defaults_tree() -> ConfigDict:
    """The loop's sections with their defaults, as the nested ConfigDict experiments edit."""
    tree = ConfigDict()
    for path, section in LOOP_SECTIONS.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            if part not in node:
                node[part] = ConfigDict()
            node = node[part]
        node[leaf] = ConfigDict(section.defaults())
    return tree


def section_of(config: ConfigDict, path: str) -> Any:
    """The ConfigDict at a dotted path (`finetune.lora`), or None when the config has none."""
    node = config
    for part in path.split("."):
        if not isinstance(node, ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def apply_preset(config: ConfigDict, explicit: set[str] = frozenset()) -> None:
    """Set the mesh sizes of `sharding.preset`, except those given explicitly as overrides."""
    name = config.sharding.preset
    if not name:
        return
    ShardingConfig.from_config(config.sharding)  # an unknown preset: its one line
    with config.mesh.unlocked():
        for axis, size in PRESETS[name].items():
            if f"mesh.{axis}" not in explicit:
                config.mesh[axis] = size
