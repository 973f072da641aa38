"""The decoder-only transformer's typed hyper-parameters (`model.*`) and the sizes derived from
them (parameter counts, FLOPs per token) that `plan`, the MFU meter and `infra list` use."""

from __future__ import annotations

import dataclasses

from infra.errors import ConfigError, check_positive_ints
from infra.models.hparams import HyperParams

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
    # blocks of the sequence the output projection and cross-entropy run over, each recomputed
    # in the backward pass (1 = all logits at once; >1 bounds the (batch, length, vocab) logits)
    loss_blocks: int = 1

    choices = {**HyperParams.choices, "remat": REMAT, "rope_scaling": ("none", "llama3")}

    def validate(self) -> None:
        check_positive_ints("model", vocab_size=self.vocab_size, d_model=self.d_model,
                            num_layers=self.num_layers, num_heads=self.num_heads,
                            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                            mlp_dim=self.mlp_dim, max_seq_len=self.max_seq_len,
                            causal_blocks=self.causal_blocks, loss_blocks=self.loss_blocks)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                              f"model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be even for rotary embeddings")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            raise ConfigError(f"model.rope_theta ({self.rope_theta}) and model.norm_eps "
                              f"({self.norm_eps}) must be > 0")
        if self.rope_scaling == "llama3":
            check_positive_ints("model", rope_original_max_len=self.rope_original_max_len)
            if not (self.rope_factor > 0 and 0 < self.rope_low_freq_factor
                    < self.rope_high_freq_factor):
                raise ConfigError(
                    f"model.rope_factor ({self.rope_factor}) must be > 0 and 0 < "
                    f"model.rope_low_freq_factor ({self.rope_low_freq_factor}) < "
                    f"model.rope_high_freq_factor ({self.rope_high_freq_factor})")

    @property
    def rope_scaling_args(self) -> tuple[float, float, float, int] | None:
        """`rope_frequencies`' scaling argument, None without scaling."""
        if self.rope_scaling == "none":
            return None
        return (self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor,
                self.rope_original_max_len)

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one block's matmuls (q, k, v, o, gate, up, down)."""
        d, h = self.d_model, self.head_dim
        return 2 * d * self.num_heads * h + 2 * d * self.num_kv_heads * h + 3 * d * self.mlp_dim

    @property
    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: every block's, plus the output
        projection (the embedding lookup itself is a gather)."""
        return self.num_layers * self.layer_matmul_params + self.vocab_size * self.d_model

    @property
    def num_params(self) -> int:
        """Every parameter of the model (embedding, blocks with their norms and biases, final
        norm, the unembedding when untied): what a run prints and `infra list` shows."""
        d, h, hd, kv = self.d_model, self.num_heads, self.head_dim, self.num_kv_heads
        block = self.layer_matmul_params + 2 * d  # + the two RMSNorm scales
        block += (h + 2 * kv) * hd if self.qkv_bias else 0
        block += d if self.out_bias else 0
        block += 2 * self.mlp_dim + d if self.mlp_bias else 0
        block += 2 * hd if self.qk_norm else 0
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * block + embeddings + d

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of the score and value matmuls per token (the whole score matrix,
        as model-FLOPs conventions count it, although causal blocks skip part of it)."""
        return 4.0 * self.num_layers * seq_len * self.num_heads * self.head_dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) model FLOPs per token at sequence length `seq_len`:
        6 per matmul weight, plus 3x the attention forward. Remat recompute is not included."""
        return 6.0 * self.matmul_params + 3.0 * self.attention_flops_per_token(seq_len)
