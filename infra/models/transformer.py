"""Decoder-only transformer LM in Flax NNX: RMSNorm, GQA attention with RoPE, SwiGLU MLP.

Every weight is an ``nnx.Param`` whose ``out_sharding`` metadata holds logical axis names
(``vocab``, ``embed``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``norm``); the config's
``sharding.rules`` map them to mesh axes. The module holds no state other than Params (no RNGs,
no dropout), so ``nnx.state(model, nnx.Param)`` is the whole state.

Two switches trade compute for memory / compile time:

* ``remat`` ("none" | "full" | "save_dots"): each block is wrapped in ``nnx.remat`` so its
  activations are recomputed in the backward pass; "full" saves only the block inputs,
  "save_dots" also keeps the weight-projection matmul outputs (dots without batch dimensions,
  i.e. not the (length x length) attention scores).
* ``scan_layers``: the blocks are one stacked ``Block`` whose params have a leading ``layers``
  dimension (``blocks/attn/q``: (num_layers, d_model, heads, head_dim), logical names ("layers",
  "embed", "heads", "head_dim")), applied with ``nnx.scan``: one block in the HLO instead of
  ``num_layers`` copies. The weights are the loop layout's, stacked: the same seed gives the same
  initial model in both layouts. Remat, when on, is applied inside the scanned body.

The attention is `infra.models.attention.attend` for training, packed fine-tuning, encoders and
serving (`infra/serve/forward.py`) alike, with a fused kernel by ``model.attention``. Causal
attention is computed in ``causal_blocks`` query blocks (default 4): block i attends to the keys
up to its own end only, skipping the upper triangle the mask would zero (5/8 of the score work
with 4 blocks; 1 = the whole matrix). The result equals the full computation.

Activations are pinned with ``infra.sharding.constrain`` (a no-op outside
``infra.sharding.activation_rules``): residual stream ("batch", "length", "act_embed"), q
("batch", "length", "act_heads", "head_dim"), k / v ("batch", "length", "act_kv_heads",
"head_dim"), MLP hidden ("batch", "length", "act_mlp"), logits ("batch", "length", "act_vocab").
Causal masking uses global positions (``jnp.arange(length)``), so it stays correct when
``length`` is split over the ``sequence`` mesh axis (GSPMD gathers K/V along length).

Packed rows (fine-tuning): with ``segment_ids`` (batch, length) a token attends only to earlier
tokens of its own segment, ``positions`` (batch, length) restarting RoPE in each. Low-rank
adapters (``infra/models/lora.py``) attach as ``<weight>_lora`` submodules of `Attention` /
`MLP`; a projection adds ``scale * (x A) B`` when one is present.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from infra.errors import ConfigError
from infra.models import moe as moe_lib
from infra.models import pipeline
from infra.models.attention import Mask, attend
from infra.models.layers import LAYERS, stack_layers
from infra.models.projection import dense, project
from infra.models.transformer_config import REMAT, TransformerConfig
from infra.sharding import activation_shards, constrain

# remat name -> jax.checkpoint policy. `dots_with_no_batch_dims_saveable` keeps the outputs of the
# weight projections (q/k/v/o, gate/up/down: dot_generals without batch dims) and recomputes the
# rest, including the attention scores/probabilities (batched dots, O(length^2) memory).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == REMAT
RESIDUAL_AXES = ("batch", "length", "act_embed")
# A layer's KV cache (serving): stores (k, v) of the new tokens, returns (keys, values, allowed)
KVUpdate = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def normal(stddev: float) -> jax.nn.initializers.Initializer:
    return jax.nn.initializers.normal(stddev=stddev)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> nnx.Param:
    """A Param initialised with ``init`` and annotated with logical axis names."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


def rope_frequencies(half: int, theta: float,
                     scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
    """The `half` rotary inverse frequencies ``theta ** (-i / half)``; with ``scaling`` =
    (factor, low_freq_factor, high_freq_factor, original_max_len), Llama 3.1's frequency-dependent
    scaling (as transformers' ``_compute_llama3_parameters``): wavelengths longer than
    ``original_max_len / low_freq_factor`` are stretched by ``factor``, shorter than
    ``original_max_len / high_freq_factor`` kept, and those between interpolated smoothly."""
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    if scaling is None:
        return inv_freq
    factor, low, high, original = scaling
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, smoothed, scaled)


def rope(x: jax.Array, positions: jax.Array, theta: float,
         scaling: tuple[float, float, float, int] | None = None) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last dim of x: (batch, length, heads,
    head_dim); ``positions`` is (length,) shared by every row, or (batch, length)."""
    half = x.shape[-1] // 2
    inv_freq = rope_frequencies(half, theta, scaling)
    if positions.ndim == 2:  # (batch, length): per-row positions (packed rows restart them)
        angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
        sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    else:
        angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (length, half)
        sin = jnp.sin(angles)[None, :, None, :]
        cos = jnp.cos(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale; computed in float32, returns ``dtype``."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs,
                 axes: tuple[str, ...] = ("norm",)):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), param_dtype, axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE on q and k; causal unless ``causal=False``
    (encoders: vision patches, forecast windows).

    Options the released Llama-family models need (all off by default): ``qkv_bias`` (Qwen2:
    biases on q, k, v), ``out_bias`` (Llama's ``attention_bias`` also biases o), ``qk_norm``
    (Qwen3: an RMSNorm over head_dim on each q and k head, before RoPE, eps ``norm_eps``) and
    ``rope_scaling`` (Llama 3.1's); ``attention``: the kernel (`model.attention`); ``precision``:
    the projections' `infra.models.projection.project` options (quantization)."""

    #: weights a low-rank adapter may target -> how many leading (input) dims each contracts
    lora_targets = {"q": 1, "k": 1, "v": 1, "o": 2}

    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope_theta: float, out_scale: float, dtype, param_dtype, rngs: nnx.Rngs,
                 causal: bool = True, causal_blocks: int = 1, qkv_bias: bool = False,
                 out_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6,
                 rope_scaling: tuple[float, float, float, int] | None = None,
                 attention: str = "xla", precision: dict | None = None):
        self.causal, self.backend, self.causal_blocks = causal, attention, causal_blocks
        self.precision = dict(precision or {})
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.dtype = dtype
        in_init = normal(1.0 / math.sqrt(d_model))
        out_init = normal(out_scale / math.sqrt(num_heads * head_dim))
        self.q = param(rngs, in_init, (d_model, num_heads, head_dim), param_dtype,
                        ("embed", "heads", "head_dim"))
        self.k = param(rngs, in_init, (d_model, num_kv_heads, head_dim), param_dtype,
                        ("embed", "kv_heads", "head_dim"))
        self.v = param(rngs, in_init, (d_model, num_kv_heads, head_dim), param_dtype,
                        ("embed", "kv_heads", "head_dim"))
        self.o = param(rngs, out_init, (num_heads, head_dim, d_model), param_dtype,
                        ("heads", "head_dim", "embed"))
        zeros = jax.nn.initializers.zeros
        if qkv_bias:
            self.q_bias = param(rngs, zeros, (num_heads, head_dim), param_dtype,
                                 ("heads", "head_dim"))
            self.k_bias = param(rngs, zeros, (num_kv_heads, head_dim), param_dtype,
                                 ("kv_heads", "head_dim"))
            self.v_bias = param(rngs, zeros, (num_kv_heads, head_dim), param_dtype,
                                 ("kv_heads", "head_dim"))
        if out_bias:
            self.o_bias = param(rngs, zeros, (d_model,), param_dtype, ("embed",))
        if qk_norm:
            common = dict(eps=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          axes=("head_dim",))
            self.q_norm = RMSNorm(head_dim, **common)
            self.k_norm = RMSNorm(head_dim, **common)

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        dt = self.dtype
        y = project(x, getattr(self, name)[...], **self.precision)
        if hasattr(self, f"{name}_lora"):  # a low-rank adapter (infra/models/lora.py)
            y = y + getattr(self, f"{name}_lora")(x)
        if hasattr(self, f"{name}_bias"):
            y = y + getattr(self, f"{name}_bias")[...].astype(dt)
        if hasattr(self, f"{name}_norm"):
            y = getattr(self, f"{name}_norm")(y)
        return y

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None, kv_cache: KVUpdate | None = None
                 ) -> jax.Array:
        """``positions``: (length,), or (batch, length) with ``segment_ids`` (batch, length): a
        packed row's examples, each with positions from 0, attend only within their segment.
        ``kv_cache(k, v) -> (keys, values, allowed)`` (serving): stores this call's keys and
        values in a cache and returns what the queries attend to (``allowed``: (batch, length,
        keys) bool); ``positions`` are then (batch, length), each row at its own position."""
        q, k, v = self.project_qkv(x, positions)
        if kv_cache is None:
            mask = Mask(causal=self.causal, positions=positions, segment_ids=segment_ids)
            blocks = self._query_blocks(x.shape[1])
        else:
            k, v, allowed = kv_cache(k, v)
            mask, blocks = Mask(allowed=allowed), None
        out = attend(q, k, v, mask, dtype=self.dtype, query_blocks=blocks, backend=self.backend)
        return self.project_out(out)

    def project_qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                        jax.Array]:
        """q (batch, length, heads, head_dim), k and v (batch, length, kv_heads, head_dim) of
        ``x`` (batch, length, d_model): biases, q/k norm, then RoPE at ``positions``."""
        x = x.astype(self.dtype)
        q = constrain(self._project(x, "q"), ("batch", "length", "act_heads", "head_dim"))
        k = constrain(self._project(x, "k"), ("batch", "length", "act_kv_heads", "head_dim"))
        v = constrain(self._project(x, "v"), ("batch", "length", "act_kv_heads", "head_dim"))
        q = rope(q, positions, self.rope_theta, self.rope_scaling)
        k = rope(k, positions, self.rope_theta, self.rope_scaling)
        return q, k, v

    def project_out(self, out: jax.Array) -> jax.Array:
        """Attention output (batch, length, heads, head_dim) -> (batch, length, d_model)."""
        y = project(out.astype(self.dtype), self.o[...], 2, **self.precision)
        if hasattr(self, "o_lora"):
            y = y + self.o_lora(out)
        if hasattr(self, "o_bias"):
            y = y + self.o_bias[...].astype(self.dtype)
        return y

    def _query_blocks(self, length: int) -> list[tuple[int, int]]:
        """Position ranges of the query blocks: ``causal_blocks`` equal blocks when causal (block
        i skips the keys after its end, which the mask would zero: 5/8 of the work with 4
        blocks), one block otherwise or when length is split over devices (a block would
        cross device boundaries)."""
        n = min(self.causal_blocks, length) if self.causal else 1
        if n == 1 or activation_shards("length") > 1:
            return [(0, length)]
        edges = [round(i * length / n) for i in range(n + 1)]
        return list(zip(edges[:-1], edges[1:]))


class MLP(nnx.Module):
    """SwiGLU feed-forward: (silu(x W_gate) * (x W_up)) W_down; ``bias``: biases on all three
    (Llama's ``mlp_bias``); ``precision``: as `Attention`'s."""

    lora_targets = {"gate": 1, "up": 1, "down": 1}

    def __init__(self, *, d_model: int, mlp_dim: int, out_scale: float, dtype, param_dtype,
                 rngs: nnx.Rngs, bias: bool = False, precision: dict | None = None):
        self.dtype = dtype
        self.precision = dict(precision or {})
        in_init = normal(1.0 / math.sqrt(d_model))
        self.gate = param(rngs, in_init, (d_model, mlp_dim), param_dtype, ("embed", "mlp"))
        self.up = param(rngs, in_init, (d_model, mlp_dim), param_dtype, ("embed", "mlp"))
        self.down = param(rngs, normal(out_scale / math.sqrt(mlp_dim)), (mlp_dim, d_model),
                           param_dtype, ("mlp", "embed"))
        if bias:
            zeros = jax.nn.initializers.zeros
            self.gate_bias = param(rngs, zeros, (mlp_dim,), param_dtype, ("mlp",))
            self.up_bias = param(rngs, zeros, (mlp_dim,), param_dtype, ("mlp",))
            self.down_bias = param(rngs, zeros, (d_model,), param_dtype, ("embed",))

    def _project(self, x: jax.Array, name: str) -> jax.Array:
        y = project(x, getattr(self, name)[...], **self.precision)
        if hasattr(self, f"{name}_lora"):  # a low-rank adapter (infra/models/lora.py)
            y = y + getattr(self, f"{name}_lora")(x)
        if hasattr(self, f"{name}_bias"):
            y = y + getattr(self, f"{name}_bias")[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = jax.nn.silu(self._project(x, "gate")) * self._project(x, "up")
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self._project(h, "down")


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a mixture of
    experts (`infra.models.moe.MoE`, attribute ``moe``) where ``moe`` gives its options."""

    def __init__(self, *, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 mlp_dim: int, rope_theta: float, norm_eps: float, out_scale: float, dtype,
                 param_dtype, rngs: nnx.Rngs, causal: bool = True, causal_blocks: int = 1,
                 mlp_bias: bool = False, moe: dict | None = None, precision: dict | None = None,
                 **attention_options):
        """``attention_options``: `Attention`'s optional features (qkv_bias, out_bias, qk_norm,
        rope_scaling); ``moe``: `MoE`'s options (`TransformerConfig.moe_options`), with
        ``shared_hidden`` the shared experts' hidden size (0: none)."""
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm = RMSNorm(d_model, eps=norm_eps, **common)
        self.attn = Attention(d_model=d_model, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, rope_theta=rope_theta, out_scale=out_scale,
                              causal=causal, causal_blocks=causal_blocks, norm_eps=norm_eps,
                              precision=precision, **attention_options, **common)
        self.mlp_norm = RMSNorm(d_model, eps=norm_eps, **common)
        if moe:
            options = dict(moe)
            shared_hidden = options.pop("shared_hidden", 0)
            shared = MLP(d_model=d_model, mlp_dim=shared_hidden, out_scale=out_scale,
                         precision=precision, **common) if shared_hidden else None
            self.moe = moe_lib.MoE(d_model=d_model, out_scale=out_scale, shared=shared,
                                   **options, **common)
        else:
            self.mlp = MLP(d_model=d_model, mlp_dim=mlp_dim, out_scale=out_scale, bias=mlp_bias,
                           precision=precision, **common)

    def forward(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                kv_cache: KVUpdate | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The block's output, and its router statistics (`moe.router_stats`; none without
        experts)."""
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, kv_cache)
        if hasattr(self, "moe"):
            y, stats = self.moe(self.mlp_norm(x))
        else:
            y, stats = self.mlp(self.mlp_norm(x)), {}
        return constrain(x + y, RESIDUAL_AXES), stats

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None, kv_cache: KVUpdate | None = None
                 ) -> jax.Array:
        return self.forward(x, positions, segment_ids, kv_cache)[0]


def _apply_block(block: Block, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    return block.forward(x, positions, segment_ids)


class Transformer(nnx.Module):
    """Decoder-only language model: tokens (batch, length) int32 -> logits (batch, length, vocab) float32."""

    Config = TransformerConfig

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = config
        compute_dtype = jnp.dtype(c.dtype)
        storage_dtype = jnp.dtype(c.param_dtype)
        self.config = c
        self.vocab_size = c.vocab_size
        self.max_seq_len = c.max_seq_len
        self.tie_embeddings = c.tie_embeddings
        self.dtype = compute_dtype
        self.num_layers = c.num_layers
        self.remat = c.remat
        self.scan_layers = c.scan_layers
        self.loss_blocks = c.loss_blocks
        out_scale = 1.0 / math.sqrt(2 * c.num_layers)  # GPT-2 residual-projection scaling

        self.embedding = param(rngs, normal(0.02), (c.vocab_size, c.d_model), storage_dtype,
                                ("vocab", "embed"))
        block_kwargs = dict(d_model=c.d_model, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                            head_dim=c.head_dim, mlp_dim=c.mlp_dim, rope_theta=c.rope_theta,
                            norm_eps=c.norm_eps, out_scale=out_scale, dtype=compute_dtype,
                            param_dtype=storage_dtype, causal_blocks=c.causal_blocks,
                            qkv_bias=c.qkv_bias, out_bias=c.out_bias, mlp_bias=c.mlp_bias,
                            qk_norm=c.qk_norm, rope_scaling=c.rope_scaling_args,
                            attention=c.attention, precision=c.precision)
        layers = [Block(**block_kwargs, moe=c.moe_options if c.is_moe_layer(i) else None,
                        rngs=rngs) for i in range(c.num_layers)]
        self.moe_layers = c.moe_layers
        if c.scan_layers:
            self.blocks = stack_layers(layers)
        else:
            self.blocks = nnx.List(layers)
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps, dtype=compute_dtype,
                                  param_dtype=storage_dtype, rngs=rngs)
        if not c.tie_embeddings:
            self.unembedding = param(rngs, normal(1.0 / math.sqrt(c.d_model)),
                                      (c.d_model, c.vocab_size), storage_dtype, ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """``segment_ids`` (batch, length) int: packed rows; tokens attend only to earlier tokens
        of their own segment (padding may be any id of its own). ``positions`` (batch, length):
        the RoPE positions (restarting at 0 in every segment of a packed row); default
        ``arange(length)`` for every row. Without both, plain causal attention."""
        x = self.hidden(tokens, positions=positions, segment_ids=segment_ids)
        return constrain(self.logits(x), ("batch", "length", "act_vocab"))

    def token_losses(self, tokens: jax.Array, targets: jax.Array, *,
                     positions: jax.Array | None = None, segment_ids: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, moe_lib.RouterTerms]:
        """(negative log-likelihood of each target, 1.0 where it is the argmax), both (batch,
        length) float32, and what the routers add to the loss and the logs (`moe.NONE`
        without experts); arguments as for ``__call__``. With ``loss_blocks`` > 1 the output
        projection and softmax run over that many blocks of the sequence, each recomputed in
        the backward pass: one block's logits exist at a time instead of (batch, length,
        vocab) of them, a large-vocabulary model's largest buffers."""
        x, stats = self._layers(tokens, positions, segment_ids)
        router = moe_lib.NONE
        if stats:
            c = self.config
            router = moe_lib.router_terms({k: v / self.moe_layers for k, v in stats.items()},
                                          c.router_aux_loss, c.router_z_loss)

        def block(x: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
            logits = constrain(self.logits(x), ("batch", "length", "act_vocab"))
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return nll, (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)

        (batch, length), n = targets.shape, self.loss_blocks
        if n == 1 or activation_shards("length") > 1:  # a block would cross devices
            return *block(x, targets), router
        if length % n:
            raise ConfigError(f"the sequence length ({length}) must be a multiple of "
                              f"model.loss_blocks ({n})")
        split = lambda a: jnp.swapaxes(a.reshape(batch, n, length // n, *a.shape[2:]), 0, 1)  # noqa: E731
        nll, correct = jax.lax.map(jax.checkpoint(lambda xt: block(*xt)), (split(x), split(targets)))
        join = lambda a: jnp.swapaxes(a, 0, 1).reshape(batch, length)  # noqa: E731
        return join(nll), join(correct), router

    def hidden(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
        """The residual stream after the last block (batch, length, d_model), before the final
        norm; arguments as for ``__call__``."""
        return self._layers(tokens, positions, segment_ids)[0]

    def _layers(self, tokens: jax.Array, positions: jax.Array | None,
                segment_ids: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`hidden`, and the router statistics summed over the layers with experts."""
        length = tokens.shape[1]
        if length > self.max_seq_len:
            raise ConfigError(f"sequence length {length} exceeds model.max_seq_len "
                              f"{self.max_seq_len}; raise model.max_seq_len or lower data.seq_len")
        if positions is None:
            positions = jnp.arange(length)
        x = self.embed(tokens)
        policy = REMAT_POLICIES[self.remat]
        schedule = pipeline.active()
        if schedule is not None:
            return pipeline.run_blocks(self.blocks, self.scan_layers, x, positions, segment_ids,
                                       schedule=schedule, policy=policy), {}
        body = _apply_block
        if self.scan_layers:
            if self.remat != "none":
                # Inside a scan body CSE cannot merge the recomputation away: no need for the
                # optimisation barriers of prevent_cse.
                body = nnx.remat(body, policy=policy, prevent_cse=False)

            @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: LAYERS})
            def run_layers(h: jax.Array, block: Block, pos: jax.Array, seg):
                return body(block, h, pos, seg)

            x, stats = run_layers(x, self.blocks, positions, segment_ids)
            return x, {k: jnp.sum(v, axis=0) for k, v in stats.items()}
        if self.remat != "none":
            body = nnx.remat(body, policy=policy)
        total: dict[str, jax.Array] = {}
        for block in self.blocks:
            x, stats = body(block, x, positions, segment_ids)
            total.update({k: total.get(k, 0.0) + v for k, v in stats.items()})
        return x, total

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids (batch, length) -> the residual stream (batch, length, d_model)."""
        # FSDP-style: gather the table's embed dim before the lookup (vocab may stay sharded);
        # a lookup into an embed-sharded table cannot be resharded to batch/length efficiently.
        table = constrain(self.embedding[...], ("vocab", "act_embed"))
        return constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), RESIDUAL_AXES)

    def logits(self, x: jax.Array) -> jax.Array:
        """The residual stream -> float32 logits: final norm, then the (tied) output projection."""
        x = self.final_norm(x)
        if self.tie_embeddings:
            return dense(x, self.embedding[...].astype(self.dtype), transpose_w=True,
                         preferred_element_type=jnp.float32)
        return dense(x, self.unembedding[...].astype(self.dtype),
                     preferred_element_type=jnp.float32)

    def cached_layers(self, x: jax.Array, positions: jax.Array,
                      kv_cache: Callable[[int], KVUpdate]) -> jax.Array:
        """The blocks over the residual stream ``x`` with a KV cache (serving, loop layout):
        ``kv_cache(i)`` is layer i's `KVUpdate`; ``positions`` (batch, length)."""
        if self.scan_layers:
            raise ValueError("a KV cache needs the loop layout; convert scan_layers parameters "
                             "first (infra.serve.loading.load_model does)")
        for i, block in enumerate(self.blocks):
            x = block(x, positions, kv_cache=kv_cache(i))
        return x
