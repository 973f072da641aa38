"""Low-rank adapters (LoRA): ``W x`` becomes ``W x + (alpha / rank) * B(A x)`` for chosen weights.

`add_adapters(model, rank=, alpha=, targets=)` gives every weight of the model whose path
matches the regex `targets` an adapter: a `LoRA` submodule ``<weight>_lora`` beside it, holding
``a`` (the weight's input dims x rank) and ``b`` (rank x the weight's output dims) as
``nnx.LoRAParam``s. The model's projections add the adapter's output when one is present
(``Attention._project``, ``MLP._project``). ``b`` starts at zero, so an adapted model computes
exactly what its base computes until it is trained; ``a`` starts uniform in
``±1/sqrt(fan_in)`` (PEFT's default), drawn per layer from the build's key, so the loop and the
scanned layouts get the same adapters.

Logical axes follow the base weight's: q ``(embed, heads, head_dim)`` -> a ``(embed,
lora_rank)``, b ``(lora_rank, heads, head_dim)``; o ``(heads, head_dim, embed)`` -> a ``(heads,
head_dim, lora_rank)``, b ``(lora_rank, embed)``; a stacked (``scan_layers``) weight's leading
``layers`` axis leads both. So the run's sharding rules place the adapters like their weights
(``lora_rank`` itself is never split).

Which weights can be adapted: those a module lists in its ``lora_targets`` (the transformer's
q, k, v, o, gate, up, down). `targets` is matched against the end of each such weight's path
in whole components: ``attn/(q|v)`` adapts ``blocks/<i>/attn/q`` and ``.../attn/v`` in every
layer, ``blocks/[0-3]/mlp/down`` the first four layers' down projections (loop layout).

Why our own adapter and not qwix's ``LoraProvider`` (checked: qwix 0.1.8): qwix intercepts
``dot_general`` / ``einsum`` calls and adds ``<weight>_lora_a/_b`` ``LoRAParam``s shaped after
the matmul's operand. Our projections reshape each weight into one 2-D matmul first
(``projection.dense``, a CPU speed-up), so qwix would create flattened adapters (q: ``(D, r)``,
``(r, H*hd)``) and derive their shardings by indexing the weight's partition spec with the 2-D
operand's dims: for o, ``(heads, head_dim, embed)`` seen as ``(heads*head_dim, embed)``, b would
get head_dim's sharding instead of embed's. It creates the parameters by running the model on
example inputs (``apply_lora_to_model``), a second traced pass beside our abstract / sharded
init, and brings dropout and quantisation machinery we do not need. Our adapter is ~100 lines:
its shapes mirror the weight's, the logical-axis rules shard it, the scan layout works
unchanged, and PEFT export is a reshape and a transpose.

The train state keeps base and adapters in one parameter tree (the checkpoint holds both, so a
resume is bit-exact); the loop trains only the ``nnx.LoRAParam`` leaves (`Task.trainable`) and
creates optimizer state only for them (`infra.state`).
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from infra.config.sections import LoraConfig
from infra.errors import ConfigError
from infra.models.projection import dense

SUFFIX = "_lora"  # adapter of weight `q` is the submodule `q_lora`
RANK_AXIS = "lora_rank"
LAYERS = "layers"


class LoRA(nnx.Module):
    """``scale * (x a) b`` for inputs whose last ``n_in`` dims are ``a``'s leading dims."""

    def __init__(self, a: jax.Array, b: jax.Array, *, a_axes: tuple, b_axes: tuple, scale: float,
                 n_in: int, dtype):
        self.a = nnx.LoRAParam(a, out_sharding=a_axes)
        self.b = nnx.LoRAParam(b, out_sharding=b_axes)
        self.scale = float(scale)
        self.n_in = n_in
        self.dtype = dtype
        self.rows = None  # several adapters stacked: `select_adapters`

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        if self.rows is not None:
            return self._per_row(x.astype(dt))
        h = dense(x.astype(dt), self.a[...].astype(dt), self.n_in)  # (..., rank)
        return dense(h, self.b[...].astype(dt)) * jnp.asarray(self.scale, dt)

    def _per_row(self, x: jax.Array) -> jax.Array:
        """Batch row i through adapter ``rows[i]`` of ``a`` (N, *in, r) and ``b`` (N, r, *out)
        (scales folded into ``b``)."""
        dt, batch = self.dtype, x.shape[0]
        a = self.a[...][self.rows].astype(dt)  # (batch, *in, r)
        b = self.b[...][self.rows].astype(dt)  # (batch, r, *out)
        rank, outs = a.shape[-1], b.shape[2:]
        lead = x.shape[1:x.ndim - self.n_in]
        h = jnp.einsum("bli,bir->blr", x.reshape(batch, -1, math.prod(a.shape[1:-1])),
                       a.reshape(batch, -1, rank))
        y = jnp.einsum("blr,bro->blo", h, b.reshape(batch, rank, -1))
        return y.reshape(batch, *lead, *outs)


def select_adapters(model: nnx.Module, rows: jax.Array) -> None:
    """Serve several adapters at once: every `LoRA` of `model` holds them stacked on a leading
    axis (``a`` (N, *in, r), ``b`` (N, r, *out), each adapter's scale folded into its ``b``;
    `infra.serve.adapters` builds them) and batch row i goes through adapter ``rows[i]``
    ((batch,) int32). Set on a model merged for one traced call."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRA):
            node.rows = rows


def _path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def adaptable(model: nnx.Module) -> list[tuple[str, nnx.Module, str, int]]:
    """(weight path, owning module, weight name, input dims) of every weight that can carry an
    adapter, in graph order."""
    out = []
    for path, node in nnx.iter_graph(model):
        targets = getattr(type(node), "lora_targets", None)
        if isinstance(node, nnx.Module) and targets:
            for name, n_in in targets.items():
                if isinstance(getattr(node, name, None), nnx.Variable):
                    out.append((_path((*path, name)), node, name, n_in))
    return out


def compile_targets(targets: str) -> re.Pattern:
    """The `finetune.lora.targets` regex, anchored to whole trailing path components."""
    if not isinstance(targets, str) or not targets:
        raise ConfigError(f"finetune.lora.targets must be a non-empty regex over parameter paths, "
                          f"got {targets!r}", key="finetune.lora.targets", value="'attn/(q|v)'")
    try:
        return re.compile(rf"(?:^|/)(?:{targets})$")
    except re.error as e:
        raise ConfigError(f"finetune.lora.targets {targets!r} is not a valid regex ({e})",
                          key="finetune.lora.targets", value="'attn/(q|v)'") from None


def matching(model: nnx.Module, targets: str) -> list[tuple[str, nnx.Module, str, int]]:
    """The adaptable weights `targets` selects; ConfigError when it selects none."""
    pattern = compile_targets(targets)
    candidates = adaptable(model)
    chosen = [c for c in candidates if pattern.search(c[0])]
    if not chosen:
        names = sorted({re.sub(r"/\d+/", "/<i>/", c[0]) for c in candidates})
        raise ConfigError(
            f"finetune.lora.targets {targets!r} matches no adaptable parameter; adaptable: "
            f"{', '.join(names) or 'none'}", key="finetune.lora.targets", value="'attn/(q|k|v|o)'")
    return chosen


def add_adapters(model: nnx.Module, *, rank: int, alpha: float, targets: str,
                 key: jax.Array) -> list[str]:
    """Attach a `LoRA` (b = 0) to every weight `targets` selects; returns their paths."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"finetune.lora.rank must be a positive integer (unset = full "
                          f"fine-tuning), got {rank}", key="finetune.lora.rank", value=8)
    added = []
    for path, owner, name, n_in in matching(model, targets):
        weight = getattr(owner, name)
        axes = tuple(weight.get_metadata().get("out_sharding") or (None,) * weight.ndim)
        shape = tuple(weight.shape)
        lead = 1 if axes and axes[0] == LAYERS else 0
        ins, outs = shape[lead:lead + n_in], shape[lead + n_in:]
        in_axes, out_axes = axes[lead:lead + n_in], axes[lead + n_in:]
        full = min(math.prod(ins), math.prod(outs))  # the rank of the weight itself
        if rank > full:
            raise ConfigError(f"finetune.lora.rank={rank} is larger than {path} can use (a "
                              f"{math.prod(ins)} x {math.prod(outs)} weight has rank at most "
                              f"{full})", key="finetune.lora.rank", value=f"<at most {full}>")
        bound = 1.0 / math.sqrt(math.prod(ins))
        # one key per (weight within its block, layer): equal adapters in both layer layouts
        inner = re.sub(r"^blocks/(\d+/)?", "", path)
        base = jax.random.fold_in(key, zlib.crc32(inner.encode()) & 0x7FFFFFFF)
        layer = re.match(r"^blocks/(\d+)/", path)

        def draw(i: int) -> jax.Array:
            return jax.random.uniform(jax.random.fold_in(base, i), (*ins, rank), weight.dtype,
                                      -bound, bound)

        if lead:
            a = jnp.stack([draw(i) for i in range(shape[0])])
        else:
            a = draw(int(layer.group(1)) if layer else 0)
        b = jnp.zeros((*shape[:lead], rank, *outs), weight.dtype)
        adapter = LoRA(a, b, a_axes=(*axes[:lead], *in_axes, RANK_AXIS),
                       b_axes=(*axes[:lead], RANK_AXIS, *out_axes), scale=alpha / rank,
                       n_in=n_in, dtype=getattr(owner, "dtype", weight.dtype))
        setattr(owner, name + SUFFIX, adapter)
        added.append(path)
    return added


# ------------------------------------------------------------------ pure-dict parameter trees


def split(params: dict) -> tuple[dict, dict]:
    """(base parameters, adapters) of a pure-dict parameter tree (either may be empty)."""
    base, adapters = {}, {}
    for k, v in params.items():
        if isinstance(k, str) and k.endswith(SUFFIX):
            adapters[k] = v
        elif isinstance(v, dict):
            b, a = split(v)
            base[k] = b
            if a:
                adapters[k] = a
        else:
            base[k] = v
    return base, adapters


def join(base: dict, adapters: dict) -> dict:
    """The inverse of `split`."""
    out = dict(base)
    for k, v in adapters.items():
        is_adapter = isinstance(k, str) and k.endswith(SUFFIX)
        out[k] = v if is_adapter else join(out[k], v)
    return out


def adapter_items(params: dict, prefix: tuple = ()) -> list[tuple[tuple, dict]]:
    """(path of the adapted weight, {"a", "b"}) of every adapter in `params`, in tree order."""
    out = []
    for k, v in params.items():
        if isinstance(k, str) and k.endswith(SUFFIX):
            out.append(((*prefix, k[: -len(SUFFIX)]), v))
        elif isinstance(v, dict):
            out += adapter_items(v, (*prefix, k))
    return out


def delta(a: jax.Array, b: jax.Array, weight_ndim: int) -> jax.Array:
    """``a b`` in the weight's layout (stacked layers: one product per layer)."""
    if a.ndim + b.ndim - 2 == weight_ndim + 1:  # (L, *in, r) x (L, r, *out)
        return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)
    return jnp.tensordot(a, b, axes=1)


def merged(params: dict, scale: float) -> dict:
    """Base parameters with every adapter folded in: ``W + scale * a b`` (float32 math)."""
    base, adapters = split(params)
    out = jax.tree.map(lambda x: x, base)
    for path, ab in adapter_items(adapters):
        node = out
        for k in path[:-1]:
            node = node[k]
        w = node[path[-1]]
        d = delta(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32), w.ndim)
        node[path[-1]] = (w.astype(jnp.float32) + scale * d).astype(w.dtype)
    return out


def settings(config: Any) -> LoraConfig:
    """The run's typed `finetune.lora` section."""
    return LoraConfig.from_config(config.finetune.lora)


def scale_of(config: Any) -> float:
    lora = settings(config)
    return lora.alpha / lora.rank


def enabled(config: Any) -> bool:
    """The config trains low-rank adapters (`finetune.lora.rank` is set)."""
    return settings(config).enabled
