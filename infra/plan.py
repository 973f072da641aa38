"""Scale planner: what a config costs per device and per step on N chips, without running it.

    python -m infra plan --config experiments/lm.py:8b --devices 256 --mesh fsdp=256 \\
        --chip tpu-v5p --price 4.2 [--compile | --no_compile] [--config.k=v ...]

The planner builds the real train step (`infra.train.build`) on a mesh of `devices` emulated CPU
devices, from abstract shapes only (`jax.eval_shape`; nothing is allocated), and reports per
device: parameter, optimizer-state, gradient and activation bytes, FLOPs per step, collective
bytes per step, and — for a chip kind from `infra.hardware` — a step time, scaling efficiency,
throughput and cost. Every number says where it comes from:

* ``exact (abstract state)``: summed from the abstract train state and the `NamedSharding` of
  every leaf (`shard_shape`), i.e. the layout a real run would use. Parameters, optimizer state,
  gradients (same shardings, param dtype) and the batch.
* ``measured (XLA)``: from the step compiled ahead of time for the emulated CPU mesh
  (`jit(...).lower(...).compile()`): `cost_analysis()["flops"]` (FLOPs of the SPMD-partitioned
  program, i.e. *per device*), `memory_analysis()` and the collectives in the compiled HLO.
  Compiling is done with ``--compile``, or automatically below `AUTO_COMPILE_MAX_PARAMS`
  parameters; an 8B model on 256 emulated devices takes too long to compile on a CPU.
* ``estimate``: analytic formulas (below) and the step-time model.

Analytic formulas (decoder-only `transformer`; d = d_model, L = layers, H / K = query / kv heads,
h = head_dim, F = mlp_dim, V = vocab, T = sequence length, B = global batch, c = bytes of the
compute dtype, p = bytes of the param dtype):

* FLOPs per step = 6 · N_mm · B·T + 12 · L · B · T² · H · h, with
  N_mm = L · (2·d·H·h + 2·d·K·h + 3·d·F) + V·d the matmul parameters (the unembedding counts once,
  tied or not; the embedding lookup is free). The second term is attention (QKᵀ and PV, 4·B·T²·H·h
  forward, ×3 with the backward; the implementation computes the full T×T scores, masked). Remat
  adds the recomputed forward: "full" + 2·L·N_layer·B·T + 4·L·B·T²·H·h, "save_dots" + 4·L·B·T²·H·h.
  Per device = total / devices.
* Activations saved for the backward pass, per layer and local token (t_x = how many ways the
  rules split dimension x over the mesh):
  none:      c·(4·d/t_d + 2·H·h/t_H + 2·K·h/t_K + 3·F/t_F) + (4 + c')·(H/t_H)·T
             (block input, two norm outputs, mid residual; q, attention output; k, v; gate, up and
             their product; f32 softmax output and the probabilities in the compute dtype, c' = c
             unless c = 4),
  save_dots: c·(3·d/t_d + H·h/t_H + 2·K·h/t_K + 2·F/t_F) per layer + one layer's "none" set,
  full:      c·d/t_d per layer + one layer's "none" set;
  plus c·d/t_d + 8·V/t_V per token for the final norm and the f32 logits and their gradient.
  Local tokens = B/(batch shards)/microbatches · T/(length shards).
* FSDP gathered-weight buffers: 2 layers of weights gathered in the compute dtype
  (2 · N_layer / t · c), when weights are sharded over a data-parallel axis.
* Collectives per device per step (S = bytes of the gathered array on one device, n = group
  size; an all-gather or reduce-scatter moves S·(n-1)/n per device, an all-reduce twice that):
  - weights sharded over data-parallel axes (`fsdp`): all-gather in the compute dtype in the
    forward and again in the backward, reduce-scatter of the gradients in the param dtype — per
    microbatch (an upper bound: XLA may keep gathered weights across microbatches);
  - gradients of weights replicated over a data-parallel axis (`data`, `sequence`): all-reduce
    in the param dtype, per microbatch;
  - tensor parallelism (weights sharded over `tensor`, Megatron style): per layer 2 forward and
    2 backward all-reduces of the local activations [B_loc, T_loc, d] in the compute dtype
    (+2 with remat), plus 2 for the vocab-sharded embedding and logits;
  - sequence parallelism (`length` over `sequence`): per layer an all-gather of K and V in the
    forward and a reduce-scatter of their gradients in the backward (+1 gather with remat).
  A group that spans k ICI domains (explicit `dcn_*` sizes, or more chips than one domain holds —
  a GPU node, a TPU slice) of m devices each is done hierarchically: S·(m-1)/m over ICI and
  S·(k-1)/(k·m) over DCN per device.
* Step time = max(compute, weight/gradient collectives) + activation collectives, where
  compute = FLOPs per device / (peak · assumed MFU, default 0.5), collective time = ICI bytes /
  (bidirectional ICI bandwidth / 2) + DCN bytes / DCN bandwidth. FSDP and data-parallel
  collectives overlap with compute (XLA schedules them asynchronously); tensor- and
  sequence-parallel activation collectives are on the critical path. Bandwidths are peak
  figures: the ICI one assumes the axis spans all torus dimensions (or NVSwitch). Scaling
  efficiency = compute time / step time. Cost per 1B tokens = price per chip-hour · devices ·
  (1e9 / tokens per second) / 3600.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time

from infra.errors import ConfigError, UserError
from infra.hardware import Chip, get_chip, known_chips

EXACT = "exact (abstract state)"
MEASURED = "measured (XLA)"
ESTIMATE = "estimate"
AUTO_COMPILE_MAX_PARAMS = 2e8  # compile the step automatically below this many parameters
DEFAULT_MFU = 0.5

_MP_NAMES = ("heads", "kv_heads", "mlp", "vocab", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
    "f8e4m3fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}


@dataclasses.dataclass
class Collective:
    """One kind of collective, summed over a step, per device."""

    what: str
    axes: tuple[str, ...]
    ici_bytes: float
    dcn_bytes: float
    overlapped: bool  # overlaps with compute (weights / gradients) vs on the critical path


@dataclasses.dataclass
class Compiled:
    """Figures from the step compiled for the emulated CPU mesh."""

    seconds: float
    flops: float | None  # cost_analysis()["flops"]: per device (SPMD-partitioned program)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    collective_bytes: float  # per device, from the compiled HLO
    collective_counts: dict[str, int]
    has_loops: bool

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass
class Plan:
    experiment: str
    devices: int
    mesh: dict[str, int]  # total size per axis (ICI x DCN)
    ici: dict[str, int]
    dcn: dict[str, int]
    chip: Chip | None
    price_per_chip_hour: float | None
    assumed_mfu: float
    unit: str  # what throughput counts ("tokens")
    param_count: int
    units_per_step: int
    param_dtype: str
    compute_dtype: str
    remat: str
    microbatches: int
    # per-device bytes
    params_bytes: int  # exact
    opt_bytes: int  # exact: optimizer state + step + rng
    grads_bytes: int  # exact shapes/shardings of the params, param dtype (x2 with accumulation)
    batch_bytes: int  # exact
    activation_bytes: float | None  # estimate
    gather_buffer_bytes: float | None  # estimate
    params_bytes_total: int
    opt_bytes_total: int
    # compute
    flops_per_device: float | None  # what step time uses: measured if compiled, else estimate
    flops_label: str
    analytic_flops_per_device: float | None
    model_flops_per_device: float | None  # without remat recompute (for MFU)
    collectives: list[Collective]
    compiled: Compiled | None
    notes: list[str]
    # step-time model (None without a chip)
    compute_s: float | None = None
    overlapped_comm_s: float | None = None
    exposed_comm_s: float | None = None
    step_s: float | None = None
    efficiency: float | None = None
    units_per_s: float | None = None
    mfu: float | None = None
    cost_per_1b: float | None = None

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.opt_bytes

    @property
    def total_bytes(self) -> float:
        """Per-device memory estimate: exact state, gradients and batch plus estimated rest."""
        return (self.params_bytes + self.opt_bytes + self.grads_bytes + self.batch_bytes
                + (self.activation_bytes or 0) + (self.gather_buffer_bytes or 0))

    @property
    def collective_ici_bytes(self) -> float:
        return sum(c.ici_bytes for c in self.collectives)

    @property
    def collective_dcn_bytes(self) -> float:
        return sum(c.dcn_bytes for c in self.collectives)

    def fits(self) -> bool | None:
        return None if self.chip is None else self.total_bytes <= self.chip.hbm_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["chip"] = self.chip.name if self.chip else None
        out["total_bytes"] = self.total_bytes
        out["fits"] = self.fits()
        if self.compiled:
            out["compiled"]["total_bytes"] = self.compiled.total_bytes
        return out


# --------------------------------------------------------------------------- inputs


def parse_mesh(text: str | dict | None) -> dict[str, int] | None:
    """`"fsdp=256"` / `"data=2,fsdp=2,tensor=2,dcn_data=2"` -> {axis: size}; axes not named are 1."""
    from infra.mesh import AXES

    if text is None or isinstance(text, dict):
        sizes = dict(text) if text else None
    else:
        sizes = {}
        for part in re.split(r"[,\s]+", text.strip()):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(f"--mesh entry '{part}' must look like axis=size, e.g. fsdp=256")
            try:
                sizes[key.strip()] = int(value)
            except ValueError:
                raise ConfigError(f"--mesh {key}={value}: size must be an integer") from None
    if sizes is None:
        return None
    known = list(AXES) + [f"dcn_{a}" for a in AXES]
    for key, size in sizes.items():
        if key not in known:
            raise ConfigError(f"unknown mesh axis '{key}'; known axes: {', '.join(known)}")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh {key}={size} must be a positive integer or -1 (fill)")
    return sizes


def _resolve_config(config, mesh: dict[str, int] | None):
    """A copy of `config` with the planned mesh sizes (unnamed axes = 1) and no distributed init."""
    from infra.mesh import AXES

    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        if mesh is not None:
            for axis in AXES:
                cfg.mesh[axis] = mesh.get(axis, 1)
                cfg.mesh[f"dcn_{axis}"] = mesh.get(f"dcn_{axis}", 1)
        cfg.distributed.initialize = "never"
    return cfg


def _build_mesh(cfg, devices: int):
    import jax

    from infra import mesh as mesh_lib

    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"--devices must be a positive integer, got {devices}")
    dcn_req = {a: cfg.mesh.get(f"dcn_{a}", 1) for a in mesh_lib.AXES}
    if any(s == -1 for s in dcn_req.values()):
        raise ConfigError("the planner needs explicit DCN sizes (mesh.dcn_<axis>), not -1")
    slices = math.prod(dcn_req.values())
    if devices % slices:
        raise ConfigError(f"{devices} devices cannot form {slices} slices (the product of the "
                          f"dcn_* sizes); choose dcn sizes whose product divides {devices}")
    ici, dcn = mesh_lib.mesh_shape(cfg.mesh, devices, slices)
    available = jax.devices()
    if len(available) < devices:
        raise ConfigError(
            f"planning for {devices} devices needs {devices} JAX devices but there are "
            f"{len(available)}; run `python -m infra plan` (it emulates --devices CPU devices) or "
            f"call infra.mesh.emulate_cpu_devices({devices}) before JAX starts"
        )
    shape = [ici[a] * dcn[a] for a in mesh_lib.AXES]
    mesh = jax.make_mesh(shape, mesh_lib.AXES, devices=available[:devices],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.AXES))
    return mesh, ici, dcn


def _abstract_batch(task, config, shardings: dict) -> dict:
    """ShapeDtypeStructs of one global batch: int32 [batch, units_per_example] per key (an LM's
    `inputs` / `targets`), or a task's own `abstract_batch(batch_size)` when it defines one."""
    import jax
    import jax.numpy as jnp

    b = config.train.batch_size
    if hasattr(task, "abstract_batch"):
        shapes = task.abstract_batch(b)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
                for k, v in shapes.items()}
    out = {}
    for key, names in task.batch_axes().items():
        shape = (b, task.units_per_example()) if len(names) >= 2 else (b,)
        out[key] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=shardings[key])
    return out


def _leaf_bytes(leaves) -> tuple[int, int]:
    """(global bytes, bytes on one device) of ShapeDtypeStructs carrying NamedShardings."""
    total = local = 0
    for x in leaves:
        size = x.dtype.itemsize
        total += math.prod(x.shape) * size
        local += math.prod(x.sharding.shard_shape(x.shape)) * size
    return total, local


# --------------------------------------------------------------------------- ICI / DCN split


class _Topology:
    """Which part of a collective over some mesh axes crosses the DCN (see module docstring)."""

    def __init__(self, axes, ici: dict, dcn: dict, chip: Chip | None):
        self.within, self.across = {}, {}
        domain = chip.ici_domain if chip else math.inf
        stride = 1
        for a in reversed(axes):  # the last axis (tensor) is innermost: fastest links
            n_ici = ici[a]
            if stride * n_ici <= domain:
                m = n_ici
            elif stride <= domain:
                m = math.gcd(n_ici, int(domain // stride))
            else:
                m = 1
            self.within[a] = m
            self.across[a] = dcn[a] * n_ici // m
            stride *= n_ici

    def split(self, axes, payload: float, reduce: bool = False) -> tuple[float, float]:
        """(ICI bytes, DCN bytes) per device of an all-gather / reduce-scatter of `payload` bytes
        (the gathered array on one device) over `axes`; `reduce=True`: an all-reduce (twice)."""
        m = math.prod(self.within[a] for a in axes)
        k = math.prod(self.across[a] for a in axes)
        factor = 2 if reduce else 1
        return factor * payload * (m - 1) / m, factor * payload * (k - 1) / (k * m)


# --------------------------------------------------------------------------- analytic model


def _factor(rules, mesh, name: str, dim: int) -> int:
    """How many ways the rules split a dimension of logical name `name` and size `dim`."""
    from infra import sharding

    spec = sharding.fit_spec(sharding.logical_to_spec((name,), rules), (dim,), mesh)
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    return math.prod(mesh.shape[a] for a in axes)


def _rule_axes(rules, names) -> set[str]:
    from infra import sharding

    out = set()
    for name in names:
        entry = sharding.logical_to_spec((name,), rules)[0]
        out |= set(entry if isinstance(entry, tuple) else (entry,) if entry else ())
    return out


def _spec_axes(spec) -> tuple[str, ...]:
    out = []
    for entry in spec:
        out += list(entry if isinstance(entry, tuple) else (entry,) if entry else ())
    return tuple(out)


@dataclasses.dataclass
class _Transformer:
    d: int
    L: int
    H: int
    K: int
    h: int
    F: int
    V: int
    T: int

    @property
    def layer_params(self) -> int:
        return 2 * self.d * self.H * self.h + 2 * self.d * self.K * self.h + 3 * self.d * self.F

    @property
    def matmul_params(self) -> int:
        return self.L * self.layer_params + self.V * self.d

    def flops(self, batch: int, remat: str) -> tuple[float, float]:
        """(hardware FLOPs incl. remat recompute, model FLOPs) for one step of `batch` sequences."""
        tokens = batch * self.T
        attn_fwd = 4 * self.L * batch * self.T**2 * self.H * self.h
        model = 6 * self.matmul_params * tokens + 3 * attn_fwd
        extra = {"full": 2 * self.L * self.layer_params * tokens + attn_fwd,
                 "save_dots": attn_fwd}.get(remat, 0)
        return model + extra, model

    def activation_bytes(self, tokens: float, c: int, t: dict[str, int], remat: str) -> float:
        d, H, K, h, F, V, T = self.d, self.H, self.K, self.h, self.F, self.V, self.T
        probs = 4 + (c if c < 4 else 0)
        full = (c * (4 * d / t["d"] + 2 * H * h / t["H"] + 2 * K * h / t["K"] + 3 * F / t["F"])
                + probs * (H / t["H"]) * T)
        dots = c * (3 * d / t["d"] + H * h / t["H"] + 2 * K * h / t["K"] + 2 * F / t["F"])
        if remat == "full":
            per_layer = self.L * c * d / t["d"] + full  # block inputs + one layer recomputed
        elif remat == "save_dots":
            per_layer = self.L * dots + full
        else:
            per_layer = self.L * full
        final = c * d / t["d"] + 8 * V / t["V"]
        return tokens * (per_layer + final)


def _transformer(cfg) -> _Transformer | None:
    m = cfg.model
    if m.get("name") != "transformer":
        return None
    return _Transformer(d=m.d_model, L=m.num_layers, H=m.num_heads, K=m.num_kv_heads, h=m.head_dim,
                        F=m.mlp_dim, V=m.vocab_size, T=cfg.data.seq_len)


# --------------------------------------------------------------------------- compiled HLO

_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<type>\([^()]*\)|[^\s()]+)\s+"
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\("
)


def _type_bytes(text: str) -> list[int]:
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            out.append(_DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x))
    return out


def _group_size(line: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[n]) for n in names if n in sizes)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_devices  # `replica_groups={}`: all devices


def hlo_collective_bytes(hlo: str, num_devices: int) -> tuple[float, dict[str, int]]:
    """Bytes each device sends in the collectives of a compiled (SPMD-partitioned) HLO module:
    all-gather S·(n-1)/n of its output S, reduce-scatter (n-1)·output, all-reduce 2·S·(n-1)/n,
    all-to-all S·(n-1)/n, collective-permute S. Ops inside loops count once."""
    total, counts = 0.0, {}
    for line in hlo.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if not m or "-done(" in line:
            continue
        op = m.group("op")
        sizes = _type_bytes(m.group("type"))
        if m.group("start") and op in ("all-gather", "collective-permute") and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2:]  # async start: (operands, outputs)
        size = float(sum(sizes))
        if op == "collective-permute":
            moved = size
        else:
            n = _group_size(line, num_devices)
            if n <= 1:
                continue
            moved = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                     "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n}[op]
        total += moved
        counts[op] = counts.get(op, 0) + 1
    return total, counts


def _compile(trainer, batch, devices: int) -> Compiled:
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.state.abstract, batch).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = cost.get("flops") if cost else None
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    coll, counts = hlo_collective_bytes(hlo, devices)
    return Compiled(
        seconds=seconds, flops=float(flops) if flops is not None else None,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        collective_bytes=coll, collective_counts=counts,
        has_loops=bool(re.search(r"\bwhile\(", hlo)),
    )


# --------------------------------------------------------------------------- the planner


def plan(config, *, devices: int, mesh: dict[str, int] | str | None = None,
         chip: str | Chip | None = None, price_per_chip_hour: float | None = None,
         compile: bool | None = None, assumed_mfu: float = DEFAULT_MFU) -> Plan:
    """Plan `config` on `devices` chips with the given mesh sizes (axes not named are 1; None:
    the config's `mesh.*`). Needs `devices` JAX devices (emulated CPU devices are enough):
    shapes are abstract, nothing is allocated. `compile`: None = when the model has fewer than
    `AUTO_COMPILE_MAX_PARAMS` parameters."""
    import jax.numpy as jnp

    from infra import sharding, train

    chip = chip if isinstance(chip, Chip) or chip is None else get_chip(chip)
    if price_per_chip_hour is not None and not price_per_chip_hour > 0:
        raise ConfigError(f"--price must be > 0 (per chip-hour), got {price_per_chip_hour}")
    if not 0 < assumed_mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {assumed_mfu}")
    cfg = _resolve_config(config, parse_mesh(mesh))
    jmesh, ici, dcn = _build_mesh(cfg, devices)
    trainer = train.build(cfg, mesh=jmesh)
    rules = sharding.normalize_rules(cfg.sharding.rules, jmesh)
    task, state = trainer.task, trainer.state.abstract
    notes: list[str] = []

    params_total, params_local = _leaf_bytes(_leaves(state["params"]))
    opt_total, opt_local = _leaf_bytes(
        _leaves(state["opt_state"]) + _leaves(state["step"]) + _leaves(state["rng"]))
    param_leaves = _leaves(state["params"])
    param_count = sum(math.prod(x.shape) for x in param_leaves)
    microbatches = int(cfg.train.get("microbatches", 1))
    grads_local = params_local * (2 if microbatches > 1 else 1)
    batch = _abstract_batch(task, cfg, trainer.batch_shardings)
    _, batch_local = _leaf_bytes(batch.values())
    units = cfg.train.batch_size * task.units_per_example()
    param_dtype = str(param_leaves[0].dtype) if param_leaves else "float32"
    compute_dtype = str(cfg.model.get("dtype", param_dtype))
    c = jnp.dtype(compute_dtype).itemsize
    remat = str(cfg.model.get("remat", "none") or "none")

    # ---- analytic model (transformer)
    model = _transformer(cfg)
    topo = _Topology(list(jmesh.axis_names), ici, dcn, chip)
    mp_axes = _rule_axes(rules, _MP_NAMES)
    dp_axes = _rule_axes(rules, ("batch", "length"))
    collectives = _weight_collectives(param_leaves, jmesh, topo, mp_axes, dp_axes, c, microbatches)
    activation = gather_buffer = analytic = model_flops = None
    if model is not None:
        B = cfg.train.batch_size
        batch_shards = _factor(rules, jmesh, "batch", B)
        length_shards = _factor(rules, jmesh, "length", model.T)
        tokens_local = B / batch_shards / microbatches * model.T / length_shards
        t = {"d": _factor(rules, jmesh, "act_embed", model.d),
             "H": _factor(rules, jmesh, "act_heads", model.H),
             "K": _factor(rules, jmesh, "act_kv_heads", model.K),
             "F": _factor(rules, jmesh, "act_mlp", model.F),
             "V": _factor(rules, jmesh, "act_vocab", model.V)}
        activation = model.activation_bytes(tokens_local, c, t, remat)
        hw, mf = model.flops(B, remat)
        analytic, model_flops = hw / devices, mf / devices
        gather_axes = {a for leaf in param_leaves for a in _spec_axes(leaf.sharding.spec)} - mp_axes
        if any(jmesh.shape[a] > 1 for a in gather_axes):
            t_w = max(1, _factor(rules, jmesh, "mlp", model.F))
            gather_buffer = 2 * model.layer_params / t_w * c
        collectives += _activation_collectives(model, jmesh, rules, topo, tokens_local, c, t,
                                               remat, microbatches)
    else:
        notes.append(f"no analytic model for model.name={cfg.model.get('name')!r}: activations, "
                     "analytic FLOPs and activation collectives are not estimated; use --compile")

    # ---- compiled program
    compiled = None
    if compile is None:
        compile = param_count < AUTO_COMPILE_MAX_PARAMS
        if not compile:
            notes.append(f"not compiled ({param_count / 1e9:.2f}B parameters >= "
                         f"{AUTO_COMPILE_MAX_PARAMS:.0e}; --compile forces it, slow on CPU)")
    if compile:
        compiled = _compile(trainer, batch, devices)
        if compiled.has_loops:
            notes.append("the compiled step has loops (scan over layers / microbatches): XLA "
                         "cost analysis and the HLO collective count may count a loop body once")
    flops, label = analytic, ESTIMATE
    if compiled is not None and compiled.flops and not (compiled.has_loops and analytic):
        flops, label = compiled.flops, MEASURED

    p = Plan(
        experiment=cfg.experiment, devices=devices, mesh=dict(jmesh.shape), ici=ici, dcn=dcn,
        chip=chip, price_per_chip_hour=price_per_chip_hour, assumed_mfu=assumed_mfu,
        unit=task.unit, param_count=param_count, units_per_step=units, param_dtype=param_dtype,
        compute_dtype=compute_dtype, remat=remat, microbatches=microbatches,
        params_bytes=params_local, opt_bytes=opt_local, grads_bytes=grads_local,
        batch_bytes=batch_local, activation_bytes=activation, gather_buffer_bytes=gather_buffer,
        params_bytes_total=params_total, opt_bytes_total=opt_total,
        flops_per_device=flops, flops_label=label, analytic_flops_per_device=analytic,
        model_flops_per_device=model_flops, collectives=collectives, compiled=compiled,
        notes=notes,
    )
    if chip is not None:
        _step_time(p, chip)
        if not p.fits() and activation and activation > p.total_bytes / 2:
            notes.append("activations dominate the memory: try --config.model.remat=full (or "
                         "save_dots), more --config.train.microbatches, or more devices")
        slice_devices = devices // math.prod(dcn.values())
        if chip.name.startswith("tpu") and slice_devices > chip.ici_domain:
            notes.append(f"{slice_devices} chips per slice exceed the largest {chip.name} slice "
                         f"({chip.ici_domain}); collectives beyond it are counted as DCN — set "
                         "mesh.dcn_* sizes to plan a multi-slice run explicitly")
    return p


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def _weight_collectives(param_leaves, mesh, topo, mp_axes, dp_axes, c, microbatches):
    """FSDP weight all-gathers (fwd + bwd), gradient reduce-scatters and all-reduces."""
    sums: dict[tuple, list] = {}

    def add(what, axes, payload, reduce=False):
        ici_b, dcn_b = topo.split(axes, payload, reduce)
        key = (what, axes)
        acc = sums.setdefault(key, [0.0, 0.0])
        acc[0] += ici_b * microbatches
        acc[1] += dcn_b * microbatches

    for leaf in param_leaves:
        local = math.prod(leaf.sharding.shard_shape(leaf.shape))
        p = leaf.dtype.itemsize
        axes = _spec_axes(leaf.sharding.spec)
        gather = tuple(a for a in mesh.axis_names if a in axes and a not in mp_axes
                       and mesh.shape[a] > 1)
        reduce = tuple(a for a in mesh.axis_names if a in dp_axes and a not in axes
                       and a not in mp_axes and mesh.shape[a] > 1)
        if gather:
            g = math.prod(mesh.shape[a] for a in gather)
            add("all-gather weights, fwd + bwd (compute dtype)", gather, 2 * local * c * g)
            add("reduce-scatter gradients (param dtype)", gather, local * p * g)
        if reduce:
            add("all-reduce gradients (param dtype)", reduce, local * p, reduce=True)
    return [Collective(what, axes, ici_b, dcn_b, overlapped=True)
            for (what, axes), (ici_b, dcn_b) in sums.items()]


def _activation_collectives(model, mesh, rules, topo, tokens_local, c, t, remat, microbatches):
    out = []
    tp_axes = tuple(a for a in mesh.axis_names if a in _rule_axes(rules, ("act_heads", "heads"))
                    and mesh.shape[a] > 1)
    if tp_axes and t["H"] > 1:
        count = model.L * (4 + (2 if remat != "none" else 0)) + 2
        ici_b, dcn_b = topo.split(tp_axes, tokens_local * model.d * c, reduce=True)
        out.append(Collective(f"tensor-parallel activation all-reduces ({count})", tp_axes,
                              ici_b * count * microbatches, dcn_b * count * microbatches,
                              overlapped=False))
    sp_axes = tuple(a for a in mesh.axis_names if a in _rule_axes(rules, ("length",))
                    and mesh.shape[a] > 1)
    if sp_axes:
        s = math.prod(mesh.shape[a] for a in sp_axes)
        count = model.L * (2 + (1 if remat != "none" else 0))
        payload = tokens_local * s * 2 * model.K * model.h / t["K"] * c  # K and V, whole length
        ici_b, dcn_b = topo.split(sp_axes, payload)
        out.append(Collective(f"sequence-parallel K/V all-gathers + grad reduce-scatters ({count})",
                              sp_axes, ici_b * count * microbatches, dcn_b * count * microbatches,
                              overlapped=False))
    return out


def _step_time(p: Plan, chip: Chip) -> None:
    if not p.flops_per_device:
        p.notes.append("no FLOPs figure: step time not estimated (use --compile)")
        return

    def seconds(cs):
        return sum(x.ici_bytes / chip.ici_egress + x.dcn_bytes / chip.dcn_bw for x in cs)

    p.compute_s = p.flops_per_device / (chip.peak_flops * p.assumed_mfu)
    p.overlapped_comm_s = seconds([x for x in p.collectives if x.overlapped])
    p.exposed_comm_s = seconds([x for x in p.collectives if not x.overlapped])
    p.step_s = max(p.compute_s, p.overlapped_comm_s) + p.exposed_comm_s
    p.efficiency = p.compute_s / p.step_s
    p.units_per_s = p.units_per_step / p.step_s
    model_flops = p.model_flops_per_device or p.flops_per_device
    p.mfu = model_flops / (p.step_s * chip.peak_flops)
    if p.price_per_chip_hour is not None:
        p.cost_per_1b = p.price_per_chip_hour * p.devices * (1e9 / p.units_per_s) / 3600


# --------------------------------------------------------------------------- output


def _bytes(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} B"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:,.3f}{suffix}"
    return f"{n:,}"


def _dur(s: float) -> str:
    if s >= 1:
        return f"{s:,.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:,.2f} ms"
    return f"{s * 1e6:,.2f} us"


def _si(x: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {prefix}"
    return f"{x:,.2f}"


def format_plan(p: Plan) -> str:
    """The plan as a text table; every figure says whether it is exact, measured or an estimate."""
    axes = " ".join(f"{a}={s}" for a, s in p.mesh.items())
    dcn = [f"dcn_{a}={s}" for a, s in p.dcn.items() if s > 1]
    lines = [
        f"plan: {p.experiment} on {p.devices} x {p.chip.name if p.chip else '(no --chip)'}, "
        f"mesh {axes}" + (f" ({', '.join(dcn)} across slices)" if dcn else ""),
        f"  {_count(p.param_count)} parameters ({p.param_dtype}), compute {p.compute_dtype}, "
        f"remat={p.remat}, microbatches={p.microbatches}; {p.units_per_step:,} {p.unit} per step",
        "",
    ]

    def row(name, value, label, width=48):
        lines.append(f"  {name:<{width}} {value:>14}   {label}")

    lines.append("per-device memory")
    row(f"parameters ({p.param_dtype})", _bytes(p.params_bytes), EXACT)
    row("optimizer state (+ step, rng)", _bytes(p.opt_bytes), EXACT)
    row("gradients (param shardings and dtype)" + (" x2" if p.microbatches > 1 else ""),
        _bytes(p.grads_bytes), EXACT)
    row("batch", _bytes(p.batch_bytes), EXACT)
    if p.activation_bytes is not None:
        row(f"activations saved for backward (remat={p.remat})", _bytes(p.activation_bytes), ESTIMATE)
    if p.gather_buffer_bytes is not None:
        row("FSDP gathered-weight buffers (2 layers)", _bytes(p.gather_buffer_bytes), ESTIMATE)
    row("total", _bytes(p.total_bytes),
        ESTIMATE if p.activation_bytes is not None else "exact parts only: no activation estimate")
    whole = p.params_bytes_total + p.opt_bytes_total
    lines.append(f"  (params + optimizer state: {_bytes(whole)} in all / {p.devices} devices = "
                 f"{_bytes(whole / p.devices)}; as sharded: {_bytes(p.state_bytes)} per device)")
    if p.chip is not None:
        hbm = p.chip.hbm_bytes
        verdict = ("fits" if p.fits() else
                   f"does NOT fit ({p.total_bytes / 2**30:,.1f} GiB > {hbm / 2**30:,.1f} GiB)")
        row(f"fits in {p.chip.name} HBM ({hbm / 2**30:,.1f} GiB)?", verdict, ESTIMATE)
    if p.compiled is not None:
        cp = p.compiled
        row("compiled: arguments (state + batch)", _bytes(cp.argument_bytes), MEASURED)
        row("compiled: temporaries", _bytes(cp.temp_bytes), f"{MEASURED}, CPU buffer assignment")
        row("compiled: total", _bytes(cp.total_bytes), f"{MEASURED}, CPU buffer assignment")
    lines.append("")

    lines.append("compute per step")
    if p.flops_per_device is not None:
        row("FLOPs per device", f"{p.flops_per_device:.3e}", p.flops_label)
        row("FLOPs, all devices", f"{p.flops_per_device * p.devices:.3e}", p.flops_label)
    cp = p.compiled
    if cp is not None and cp.flops and p.flops_label != MEASURED:
        row("FLOPs per device, XLA cost analysis", f"{cp.flops:.3e}",
            f"{MEASURED}, loop bodies counted once: not used")
    if p.analytic_flops_per_device is not None and p.flops_label == MEASURED:
        ratio = p.analytic_flops_per_device / p.flops_per_device
        row("FLOPs per device, analytic", f"{p.analytic_flops_per_device:.3e}",
            f"{ESTIMATE} ({ratio:.0%} of measured)")
    if p.flops_per_device is None:
        lines.append("  no FLOPs figure (no analytic model; use --compile)")
    lines.append("")

    lines.append(f"collectives per device per step {'ICI':>41} {'DCN':>12}")
    for x in p.collectives:
        lines.append(f"  {x.what + ' over ' + ','.join(x.axes):<62} {_bytes(x.ici_bytes):>12} "
                     f"{_bytes(x.dcn_bytes):>12}   {ESTIMATE}")
    if not p.collectives:
        lines.append(f"  {'none (one device, or nothing sharded)':<62} {_bytes(0):>12} {_bytes(0):>12}")
    lines.append(f"  {'total':<62} {_bytes(p.collective_ici_bytes):>12} "
                 f"{_bytes(p.collective_dcn_bytes):>12}   {ESTIMATE}")
    if cp is not None:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(cp.collective_counts.items()))
        lines.append(f"  {'compiled HLO: ' + (ops or 'none'):<62} {_bytes(cp.collective_bytes):>12} "
                     f"{'':>12}   {MEASURED}, CPU program (all-reduce where TPU/GPU reduce-scatter)")
    lines.append("")

    if p.chip is not None and p.step_s is not None:
        ch = p.chip
        lines.append(f"step time on {ch.name}: compute at {p.assumed_mfu:.0%} of "
                     f"{ch.peak_flops / 1e12:,.0f} TFLOP/s; ICI {ch.ici_egress / 1e9:,.0f} GB/s, "
                     f"DCN {ch.dcn_bw / 1e9:,.2f} GB/s per chip and direction")
        row("compute", _dur(p.compute_s), ESTIMATE)
        row("weight/gradient collectives (overlap compute)", _dur(p.overlapped_comm_s), ESTIMATE)
        row("activation collectives (critical path)", _dur(p.exposed_comm_s), ESTIMATE)
        row("step time", _dur(p.step_s), ESTIMATE)
        row("scaling efficiency (compute / step time)", f"{p.efficiency:.1%}", ESTIMATE)
        row(f"{p.unit}/s, all chips", _si(p.units_per_s), ESTIMATE)
        row(f"{p.unit}/s per chip", f"{p.units_per_s / p.devices:,.0f}", ESTIMATE)
        row("MFU (model FLOPs / peak)", f"{p.mfu:.1%}", ESTIMATE)
        if p.cost_per_1b is not None:
            row(f"cost per 1B {p.unit} at ${p.price_per_chip_hour:g}/chip-hour",
                f"${p.cost_per_1b:,.2f}", ESTIMATE)
        else:
            lines.append(f"  (give --price <$ per chip-hour> for the cost per 1B {p.unit})")
    elif p.chip is None:
        lines.append(f"step time and cost: give --chip ({', '.join(known_chips())})")
    for note in p.notes:
        lines.append(f"note: {note}")
    lines.append("exact = from the abstract train state and its shardings; measured = from the "
                 "step compiled for emulated CPU devices; estimate = analytic model (formulas: "
                 "infra/plan.py docstring)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `plan` command's arguments (the CLI's subparser, or `main`'s own parser)."""
    parser.add_argument("--config", required=True, help="experiments/<name>.py[:variant]")
    parser.add_argument("--devices", type=int, required=True,
                        help="number of chips to plan for (emulated as CPU devices)")
    parser.add_argument("--mesh", default=None,
                        help="mesh sizes, e.g. fsdp=256 or data=2,fsdp=64,tensor=2,dcn_data=2; "
                             "axes not named are 1 (default: the config's mesh.*)")
    parser.add_argument("--chip", default=None, help=f"chip kind: {', '.join(known_chips())}")
    parser.add_argument("--price", type=float, default=None, help="$ per chip-hour")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help="assumed fraction of peak FLOP/s the compute reaches (default 0.5)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--compile", dest="compile", action="store_true", default=None,
                       help="compile the step for the emulated devices (measured FLOPs/memory)")
    group.add_argument("--no_compile", dest="compile", action="store_false",
                       help="never compile (default: compile below 2e8 parameters)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_cli(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run `plan` from parsed arguments; JAX must already see `args.devices` devices."""
    from infra import config as config_lib

    cfg = config_lib.load(args.config, overrides)
    p = plan(cfg, devices=args.devices, mesh=args.mesh, chip=args.chip,
             price_per_chip_hour=args.price, compile=args.compile, assumed_mfu=args.mfu)
    print(json.dumps(p.to_dict(), indent=2, default=str) if args.json else format_plan(p))
    return 0


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides, i = [], [], 0
    while i < len(argv):
        if argv[i].startswith("--config."):
            overrides.append(argv[i])
            if "=" not in argv[i] and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(argv[i])
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    """`plan` as a function of command-line arguments (what `python -m infra plan` runs).

    Emulates `--devices` CPU devices if JAX has not started yet; otherwise JAX must already have
    that many devices. Bad input prints one line and returns 2."""
    from infra import mesh as mesh_lib

    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    parser = argparse.ArgumentParser(prog="infra plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        if args.devices < 1:
            raise ConfigError(f"--devices must be >= 1, got {args.devices}")
        try:
            mesh_lib.emulate_cpu_devices(args.devices)
        except ConfigError:
            pass  # JAX already started: `plan` checks that it has enough devices
        return run_cli(args, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
