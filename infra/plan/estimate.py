"""The planner's analytic model: what a step should cost when there is no compiled program to
measure (compiling an 8B model for 256 emulated devices takes too long on a CPU).

Formulas (decoder-only `transformer`; d = d_model, L = layers, H / K = query / kv heads,
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
  plus c·d/t_d + 8·V/(t_V·n) per token for the final norm and the f32 logits and their
  gradient, n = `model.loss_blocks` (one block of the sequence's logits exists at a time).
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
* Pipeline stages (`mesh.stage` = S > 1, M microbatches, R repeats, T = R·M + S − 1 ticks): the
  bubble is (S − 1) / T of the stage-ticks, and the idle ticks compute like busy ones (the
  layers' FLOPs × T / (R·M)); activations in flight and the point-to-point sends: `_pipeline`.
* Step time = max(compute, weight/gradient collectives) + activation collectives, where
  compute = FLOPs per device / (peak · assumed MFU, default 0.5), collective time = ICI bytes /
  (bidirectional ICI bandwidth / 2) + DCN bytes / DCN bandwidth. FSDP and data-parallel
  collectives overlap with compute (XLA schedules them asynchronously); tensor- and
  sequence-parallel activation collectives are on the critical path. Bandwidths are peak
  figures: the ICI one assumes the axis spans all torus dimensions (or NVSwitch). Scaling
  efficiency = compute time / step time. Cost per 1B tokens = price per chip-hour · devices ·
  (1e9 / tokens per second) / 3600.

Everything here reads abstract shapes and shardings; nothing is allocated or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from infra.hardware import Chip

# Logical names whose sharding is model parallelism: weights split over them are never gathered.
MODEL_PARALLEL_NAMES = ("heads", "kv_heads", "mlp", "vocab",
                        "act_heads", "act_kv_heads", "act_mlp", "act_vocab")


@dataclasses.dataclass
class Collective:
    """One kind of collective, summed over a step, per device."""

    what: str
    axes: tuple[str, ...]
    ici_bytes: float
    dcn_bytes: float
    overlapped: bool  # overlaps with compute (weights / gradients) vs on the critical path


@dataclasses.dataclass
class Estimate:
    """The analytic figures of one plan; the transformer-only ones are None for other models."""

    model: AnalyticTransformer | None
    collectives: list[Collective]
    activation_bytes: float | None = None  # per device
    gather_buffer_bytes: float | None = None  # per device
    pipeline: dict | None = None  # pipeline stages: the schedule's figures (`_pipeline`)
    flops_per_device: float | None = None  # with remat recompute
    model_flops_per_device: float | None = None  # without it (for MFU)


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute_s: float
    overlapped_comm_s: float
    exposed_comm_s: float
    step_s: float
    efficiency: float
    units_per_s: float
    mfu: float
    cost_per_1b: float | None


# --------------------------------------------------------------------------- the transformer


@dataclasses.dataclass
class AnalyticTransformer:
    """A decoder-only `transformer` at sequence length T: its FLOPs (the model's own formula,
    `TransformerConfig.flops_per_token`) and the activation-memory formulas above."""

    config: Any  # infra.models.transformer_config.TransformerConfig
    T: int
    rows: int  # sequences per step (GRPO: completions; DPO: both of each pair)

    @classmethod
    def from_config(cls, cfg) -> AnalyticTransformer | None:
        """The model of `cfg`, or None when it is not a `transformer` (no analytic model)."""
        if cfg.model.get("name") != "transformer":
            return None
        from infra.models import hyper_params
        from infra.tasks import get_task

        rows, length = get_task(cfg).step_rows(cfg.train.batch_size)
        return cls(config=hyper_params(cfg.model), T=length, rows=rows)

    d = property(lambda self: self.config.d_model)
    L = property(lambda self: self.config.num_layers)
    H = property(lambda self: self.config.num_heads)
    K = property(lambda self: self.config.num_kv_heads)
    h = property(lambda self: self.config.head_dim)
    F = property(lambda self: self.config.mlp_dim)
    V = property(lambda self: self.config.vocab_size)

    @property
    def matmul_params(self) -> int:
        return self.config.matmul_params

    def flops_per_token(self) -> int:
        """Model FLOPs (forward + backward, no remat) per token at sequence length T."""
        return int(self.config.flops_per_token(self.T))

    def remat_flops_per_token(self, remat: str) -> int:
        """The forward recomputed in the backward pass, per token."""
        attn_fwd = self.config.attention_flops_per_token(self.T)
        return int({"full": 2 * self.L * self.config.layer_matmul_params + attn_fwd,
                    "save_dots": attn_fwd}.get(remat, 0))

    def step_flops(self, batch: int, remat: str) -> tuple[float, float]:
        """(hardware FLOPs incl. remat recompute, model FLOPs) for one step of `batch` sequences."""
        tokens = batch * self.T
        model = self.flops_per_token() * tokens
        return model + self.remat_flops_per_token(remat) * tokens, model

    def layer_bytes(self, c: int, t: dict[str, int]) -> tuple[float, float]:
        """Bytes per local token one layer saves for the backward pass: (everything, the
        weight projections' outputs only — what `save_dots` keeps)."""
        d, H, K, h, F, T = self.d, self.H, self.K, self.h, self.F, self.T
        probs = 4 + (c if c < 4 else 0)
        full = (c * (4 * d / t["d"] + 2 * H * h / t["H"] + 2 * K * h / t["K"] + 3 * F / t["F"])
                + probs * (H / t["H"]) * T)
        dots = c * (3 * d / t["d"] + H * h / t["H"] + 2 * K * h / t["K"] + 2 * F / t["F"])
        return full, dots

    def final_bytes(self, c: int, t: dict[str, int]) -> float:
        """Bytes per local token of the final norm and the f32 logits and their gradient."""
        return c * self.d / t["d"] + 8 * self.V / t["V"] / self.config.loss_blocks

    def activation_bytes(self, tokens: float, c: int, t: dict[str, int], remat: str) -> float:
        full, dots = self.layer_bytes(c, t)
        if remat == "full":
            per_layer = self.L * c * self.d / t["d"] + full  # block inputs + one layer recomputed
        elif remat == "save_dots":
            per_layer = self.L * dots + full
        else:
            per_layer = self.L * full
        return tokens * (per_layer + self.final_bytes(c, t))


# --------------------------------------------------------------------------- ICI / DCN split


class Topology:
    """Which part of a collective over some mesh axes crosses the DCN (see the docstring above)."""

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


# --------------------------------------------------------------------------- the estimate


def estimate(cfg, mesh, rules, param_leaves, *, ici: dict[str, int], dcn: dict[str, int],
             chip: Chip | None, compute_bytes: int, remat: str, microbatches: int,
             stages=None) -> Estimate:
    """The analytic figures for `cfg` on `mesh`: collectives of the weights (any model) and, for
    a transformer, activations, gathered-weight buffers, FLOPs and activation collectives.
    `param_leaves`: abstract parameters carrying their `NamedSharding`s."""
    c = compute_bytes
    topo = Topology(list(mesh.axis_names), ici, dcn, chip)
    mp_axes = _rule_axes(rules, MODEL_PARALLEL_NAMES)
    dp_axes = _rule_axes(rules, ("batch", "length"))
    collectives = _weight_collectives(param_leaves, mesh, topo, mp_axes, dp_axes, c, microbatches)
    model = AnalyticTransformer.from_config(cfg)
    if model is None:
        return Estimate(model=None, collectives=collectives)

    B = model.rows
    batch_shards = _factor(rules, mesh, "batch", B)
    length_shards = _factor(rules, mesh, "length", model.T)
    tokens_local = B / batch_shards / microbatches * model.T / length_shards
    t = {"d": _factor(rules, mesh, "act_embed", model.d),
         "H": _factor(rules, mesh, "act_heads", model.H),
         "K": _factor(rules, mesh, "act_kv_heads", model.K),
         "F": _factor(rules, mesh, "act_mlp", model.F),
         "V": _factor(rules, mesh, "act_vocab", model.V)}
    hw, mf = model.step_flops(B, remat)
    gather_buffer = None
    gather_axes = {a for leaf in param_leaves for a in _spec_axes(leaf.sharding.spec)} - mp_axes
    if any(mesh.shape[a] > 1 for a in gather_axes):
        t_w = max(1, _factor(rules, mesh, "mlp", model.F))
        gather_buffer = 2 * model.config.largest_layer_params / t_w * c
    collectives += _activation_collectives(model, mesh, rules, topo, tokens_local, c, t, remat,
                                           microbatches)
    activations, pipeline = model.activation_bytes(tokens_local, c, t, remat), None
    if stages is not None:
        pipeline = _pipeline(model, stages, mesh, rules, topo, param_leaves, c, t, remat,
                             microbatches, tokens_local)
        collectives += pipeline.pop("collectives")
        activations = pipeline["activation_bytes"]
        # idle ticks compute like busy ones: the layers' FLOPs grow by T / (R M); with remat
        # each tick's forward runs once more
        layers = hw - 6 * model.V * model.d * B * model.T
        if remat != "none":
            layers += model.remat_flops_per_token("full") * B * model.T
        hw += layers * stages.ticks / (stages.repeats * stages.microbatches) - layers
    return Estimate(model=model, collectives=collectives, activation_bytes=activations,
                    gather_buffer_bytes=gather_buffer, pipeline=pipeline,
                    flops_per_device=hw / mesh.size, model_flops_per_device=mf / mesh.size)


def _pipeline(model, stages, mesh, rules, topo, param_leaves, c, t, remat, microbatches,
              tokens_local) -> dict:
    """The pipeline schedule's figures per device (`infra.models.pipeline`): its bubble, the
    activations in flight, the point-to-point sends and, with repeats, the weights' re-arrangement.

    With S stages, M microbatches, R repeats, T = R M + S - 1 ticks and a microbatch of m local
    tokens (the batch split over the data axes, accumulation steps and M): a stage saves for
    the backward pass, besides the buffer of M microbatch inputs, either every layer's
    activations of each microbatch it runs (remat=none: R M chunks of L / (S R) layers) or only
    each tick's input, recomputing one tick at a time with its blocks rematerialised by the
    policy. Each tick it sends one microbatch's activations (m d c bytes) to the next stage,
    and their gradient back."""
    from infra.sharding import rules_without

    S, M, R, T = stages.stages, stages.microbatches, stages.repeats, stages.ticks
    inner = rules_without(rules, "stage")
    m = (model.rows / _factor(inner, mesh, "batch", model.rows) / microbatches / M
         * model.T / _factor(inner, mesh, "length", model.T))
    send = m * model.d / t["d"] * c
    chunk = model.L // (S * R)
    full, dots = model.layer_bytes(c, t)
    if remat == "none":
        saved = R * M * chunk * full * m
    else:  # each tick's input; while a tick is recomputed, its blocks' saved set and one layer's
        kept = dots if remat == "save_dots" else c * model.d / t["d"]
        saved = T * send + chunk * kept * m + full * m
    in_flight = M * send + saved + tokens_local * model.final_bytes(c, t)
    p2p = 2 * T * send * microbatches
    slices = topo.across["stage"]
    dcn_share = slices / S if slices > 1 else 0.0
    collectives = [Collective("pipeline sends to the next stage, fwd + bwd", ("stage",),
                              p2p * (1 - dcn_share), p2p * dcn_share, overlapped=False)]
    if R > 1:  # the chunks are not the contiguous blocks the checkpoint's layout shards
        local = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                    for x in param_leaves if "stage" in _spec_axes(x.sharding.spec))
        ici_b, dcn_b = topo.split(("stage",), 2 * local * microbatches)
        collectives.append(Collective("pipeline re-arrangement of weights (repeats > 1) and "
                                      "gradients", ("stage",), ici_b, dcn_b, overlapped=False))
    return dict(stages=S, microbatches=M, repeats=R, ticks=T, bubble=stages.bubble,
                activation_bytes=in_flight, point_to_point_bytes=p2p, collectives=collectives)


def step_time(flops_per_device: float, model_flops_per_device: float | None,
              collectives: list[Collective], chip: Chip, *, assumed_mfu: float,
              units_per_step: int, devices: int, price_per_chip_hour: float | None) -> StepTime:
    """Compute overlapped with weight/gradient collectives, plus the activation collectives."""

    def seconds(cs):
        return sum(x.ici_bytes / chip.ici_egress + x.dcn_bytes / chip.dcn_bw for x in cs)

    compute = flops_per_device / (chip.peak_flops * assumed_mfu)
    overlapped = seconds([x for x in collectives if x.overlapped])
    exposed = seconds([x for x in collectives if not x.overlapped])
    step = max(compute, overlapped) + exposed
    units_per_s = units_per_step / step
    model_flops = model_flops_per_device or flops_per_device
    cost = (None if price_per_chip_hour is None
            else price_per_chip_hour * devices * (1e9 / units_per_s) / 3600)
    return StepTime(compute_s=compute, overlapped_comm_s=overlapped, exposed_comm_s=exposed,
                    step_s=step, efficiency=compute / step, units_per_s=units_per_s,
                    mfu=model_flops / (step * chip.peak_flops), cost_per_1b=cost)


# --------------------------------------------------------------------------- collectives


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
        # a weight split over `expert` / `stage` is the experts' / stage's own (model parallel);
        # the others are replicated over it, one more data axis for their gradients
        gather = tuple(a for a in mesh.axis_names if a in axes and a not in mp_axes
                       and a not in ("expert", "stage") and mesh.shape[a] > 1)
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
    """Tensor-parallel activation all-reduces, sequence-parallel K/V gathers and the experts'
    dispatch over `expert`."""
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
    moe_layers = model.config.moe_layers
    experts = mesh.shape.get("expert", 1)
    if moe_layers and experts > 1:
        # `infra.models.moe_parallel`: each MoE layer all-gathers its tokens over `expert` and
        # reduce-scatters the result; the backward does the transposes (and remat the forward)
        count = moe_layers * (4 + (2 if remat != "none" else 0))
        ici_b, dcn_b = topo.split(("expert",), tokens_local * experts * model.d * c)
        out.append(Collective(f"expert dispatch all-gathers + reduce-scatters ({count})",
                              ("expert",), ici_b * count * microbatches,
                              dcn_b * count * microbatches, overlapped=False))
    return out


# --------------------------------------------------------------------------- sharding rules


def _factor(rules, mesh, name: str, dim: int) -> int:
    """How many ways the rules split a dimension of logical name `name` and size `dim`."""
    from infra import sharding

    spec = sharding.fit_spec(sharding.logical_to_spec((name,), rules), (dim,), mesh)
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],) if spec[0] else ()
    return math.prod(mesh.shape[a] for a in axes)


def _rule_axes(rules, names) -> set[str]:
    """The mesh axes the rules map any of the logical `names` to."""
    from infra import sharding

    out = set()
    for name in names:
        entry = sharding.logical_to_spec((name,), rules)[0]
        out |= set(entry if isinstance(entry, tuple) else (entry,) if entry else ())
    return out


def _spec_axes(spec) -> tuple[str, ...]:
    """The mesh axes a PartitionSpec uses, in order."""
    out = []
    for entry in spec:
        out += list(entry if isinstance(entry, tuple) else (entry,) if entry else ())
    return tuple(out)
