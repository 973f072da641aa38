"""The decoder-only transformer's typed hyper-parameters (`model.*`) and the sizes derived from
them (parameter counts, FLOPs per token) that `plan`, the MFU meter and `infra list` use."""

from __future__ import annotations

import dataclasses

from infra.errors import ConfigError, check_positive_ints
from infra.models.hparams import HyperParams

#: `model.attention`: the kernels of `infra.models.attention_kernels`
ATTENTION_BACKENDS = ("xla", "splash", "cudnn", "auto")
#: `model.quantization`: the projections' training precision (`infra.models.projection`)
QUANTIZATION = ("none", "int8", "fp8")

# `model.remat`: recompute activations in the backward pass (policies: transformer.REMAT_POLICIES)
REMAT = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class TransformerConfig(HyperParams):
    """The decoder-only transformer's `model.*` keys. Shape fields have no default: the base
    config and the experiments choose the model's size."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    # Options of released Llama-family models (infra/interop imports them); off = our own model.
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    out_bias: bool = False  # a bias on the attention output projection (Llama attention_bias)
    mlp_bias: bool = False  # biases on gate, up, down (Llama mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm over head_dim on q and k before RoPE (Qwen3)
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1 / 3.2 frequency-dependent scaling)
    rope_factor: float = 8.0  # llama3 scaling: factor
    rope_low_freq_factor: float = 1.0  # llama3 scaling: low_freq_factor
    rope_high_freq_factor: float = 4.0  # llama3 scaling: high_freq_factor
    rope_original_max_len: int = 8192  # llama3 scaling: original_max_position_embeddings
    dtype: str = "float32"  # compute dtype; "bfloat16" on accelerators (params stay float32)
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | save_dots: recompute activations in the backward pass
    scan_layers: bool = False  # one stacked block applied with a scan: faster compiles
    causal_blocks: int = 4  # query blocks of causal attention (1 = the whole score matrix)
    attention: str = "auto"  # xla | splash (TPU) | cudnn (GPU) | auto (by backend)
    # quantization-aware training of the projections (q, k, v, o, MLP): none | int8 | fp8;
    # quantize_backward: their gradients too (int8, or fp8 e5m2). Parameters stay float.
    quantization: str = "none"
    quantize_backward: bool = False
    # blocks of the sequence the output projection and cross-entropy run over, each recomputed
    # in the backward pass (1 = all logits at once; >1 bounds the (batch, length, vocab) logits)
    loss_blocks: int = 1
    # Mixture of experts (infra/models/moe.py): 0 experts = dense MLPs in every layer
    num_experts: int = 0
    experts_per_token: int = 2  # top-k
    moe_intermediate_size: int = 0  # each expert's hidden size (0 = mlp_dim)
    moe_every: int = 1  # layer i has experts when (i + 1) % moe_every == 0 (decoder_sparse_step)
    dense_layers: str = ""  # comma-separated layer indices kept dense (mlp_only_layers)
    norm_topk_prob: bool = True  # renormalise the top-k probabilities (Mixtral, Qwen3-MoE)
    capacity_factor: float = 0.0  # <= 0: dropless; > 0: each expert takes that share, drops the rest
    router_aux_loss: float = 0.0  # weight of the load-balancing loss (Switch / Mixtral form)
    router_z_loss: float = 0.0  # weight of the router z-loss (ST-MoE)
    shared_experts: int = 0  # dense experts every token goes through (DeepSeek), each of moe size

    choices = {**HyperParams.choices, "remat": REMAT, "rope_scaling": ("none", "llama3"),
               "quantization": QUANTIZATION}

    def validate(self) -> None:
        check_positive_ints("model", vocab_size=self.vocab_size, d_model=self.d_model,
                            num_layers=self.num_layers, num_heads=self.num_heads,
                            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            mlp_dim=self.mlp_dim, max_seq_len=self.max_seq_len,
                            causal_blocks=self.causal_blocks, loss_blocks=self.loss_blocks)
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"model.attention must be one of "
                              f"{', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}",
                              key="model.attention", value="auto")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ConfigError(f"model.rope_theta ({self.rope_theta}) and model.norm_eps "
                              f"({self.norm_eps}) must be > 0")
        if self.num_experts:
            self._validate_moe()
        if self.rope_scaling == "llama3":
            check_positive_ints("model", rope_original_max_len=self.rope_original_max_len)
            if not (self.rope_factor > 0 and 0 < self.rope_low_freq_factor
                    < self.rope_high_freq_factor):
                raise ConfigError(
                    f"model.rope_factor ({self.rope_factor}) must be > 0 and 0 < "
                    f"model.rope_low_freq_factor ({self.rope_low_freq_factor}) < "
                    f"model.rope_high_freq_factor ({self.rope_high_freq_factor})")

    def _validate_moe(self) -> None:
        check_positive_ints("model", num_experts=self.num_experts,
                            experts_per_token=self.experts_per_token, moe_every=self.moe_every)
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"model.experts_per_token ({self.experts_per_token}) exceeds "
                              f"model.num_experts ({self.num_experts})")
        if self.moe_intermediate_size < 0 or self.shared_experts < 0:
            raise ConfigError("model.moe_intermediate_size and model.shared_experts must be >= 0")
        if self.router_aux_loss < 0 or self.router_z_loss < 0:
            raise ConfigError(f"model.router_aux_loss ({self.router_aux_loss}) and "
                              f"model.router_z_loss ({self.router_z_loss}) must be >= 0")
        dense = self.dense_layer_indices
        if any(not 0 <= i < self.num_layers for i in dense):
            raise ConfigError(f"model.dense_layers ({self.dense_layers!r}) must list layers in "
                              f"[0, {self.num_layers})")
        kinds = {self.is_moe_layer(i) for i in range(self.num_layers)}
        if self.scan_layers and len(kinds) > 1:
            raise ConfigError("model.scan_layers stacks identical layers; with some layers "
                              "dense (model.moe_every / model.dense_layers) set "
                              "model.scan_layers=false", key="model.scan_layers", value=False)

    @property
    def precision(self) -> dict:
        """What each projection is computed in (`infra.models.projection.project`'s options)."""
        return dict(quantization=self.quantization, backward=self.quantize_backward)

    @property
    def dense_layer_indices(self) -> tuple[int, ...]:
        try:
            return tuple(int(i) for i in self.dense_layers.split(",") if i.strip())
        except ValueError:
            raise ConfigError(f"model.dense_layers must be comma-separated layer indices, got "
                              f"{self.dense_layers!r}") from None

    def is_moe_layer(self, i: int) -> bool:
        """Layer `i` has experts (instead of a dense MLP)."""
        return (self.num_experts > 0 and (i + 1) % self.moe_every == 0
                and i not in self.dense_layer_indices)

    @property
    def moe_layers(self) -> int:
        """How many layers have experts."""
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def moe_options(self) -> dict:
        """What `Block(moe=...)` builds a layer's experts from."""
        return dict(num_experts=self.num_experts, experts_per_token=self.experts_per_token,
                    hidden=self.moe_hidden, norm_topk_prob=self.norm_topk_prob,
                    capacity_factor=self.capacity_factor,
                    shared_hidden=self.shared_experts * self.moe_hidden)

    @property
    def moe_hidden(self) -> int:
        """Each expert's hidden size."""
        return self.moe_intermediate_size or self.mlp_dim

    def _mlp_params(self, i: int, active: bool) -> int:
        """Matmul weights of layer `i`'s feed-forward: the dense MLP, or the router, the experts
        (those a token uses when `active`) and the shared experts."""
        d = self.d_model
        if not self.is_moe_layer(i):
            return 3 * d * self.mlp_dim
        experts = self.experts_per_token if active else self.num_experts
        return d * self.num_experts + 3 * d * self.moe_hidden * (experts + self.shared_experts)

    @property
    def rope_scaling_args(self) -> tuple[float, float, float, int] | None:
        """`rope_frequencies`' scaling argument, None without scaling."""
        if self.rope_scaling == "none":
            return None
        return (self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_max_len)

    @property
    def attention_params(self) -> int:
        """Weights of one block's attention projections (q, k, v, o)."""
        d, h = self.d_model, self.head_dim
        return 2 * d * self.num_heads * h + 2 * d * self.num_kv_heads * h

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls a token uses, on average over the layers (q, k, v, o,
        and the MLP's or the router's and its experts')."""
        mlp = sum(self._mlp_params(i, active=True) for i in range(self.num_layers))
        return self.attention_params + mlp // self.num_layers

    @property
    def largest_layer_params(self) -> int:
        """Matmul weights of the largest block, every expert included (what FSDP gathers)."""
        return self.attention_params + max(self._mlp_params(i, active=False)
                                           for i in range(self.num_layers))

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every block's (with experts: the
        active ones), plus the output projection (the embedding lookup itself is a gather)."""
        layers = sum(self._mlp_params(i, active=True) for i in range(self.num_layers))
        return (self.num_layers * self.attention_params + layers
                + self.vocab_size * self.d_model)

    @property
    def num_params(self) -> int:
        """Every parameter of the model (embedding, blocks with their norms and biases, every
        expert, final norm, the unembedding when untied): what a run prints and `infra list`
        shows."""
        d, h, hd, kv = self.d_model, self.num_heads, self.head_dim, self.num_kv_heads
        block = self.attention_params + 2 * d  # + the two RMSNorm scales
        block += (h + 2 * kv) * hd if self.qkv_bias else 0
        block += d if self.out_bias else 0
        block += 2 * hd if self.qk_norm else 0
        mlps = sum(self._mlp_params(i, active=False) + (
            2 * self.mlp_dim + d if self.mlp_bias and not self.is_moe_layer(i) else 0)
            for i in range(self.num_layers))
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + mlps + embeddings + d

    @property
    def active_params(self) -> int:
        """Parameters one token uses: `num_params` less the experts it is not routed to."""
        return self.num_params - sum(self._mlp_params(i, active=False)
                                     - self._mlp_params(i, active=True)
                                     for i in range(self.num_layers))

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the score and value matmuls per token (the whole score matrix,
        as model-FLOPs conventions count it, although causal blocks skip part of it)."""
        return 4.0 * self.num_layers * seq_len * self.num_heads * self.head_dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) model FLOPs per token at sequence length `seq_len`:
        6 per matmul weight, plus 3x the attention forward. Remat recompute is not included."""
        return 6.0 * self.matmul_params + 3.0 * self.attention_flops_per_token(seq_len)
