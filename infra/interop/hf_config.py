"""A Hugging Face `config.json` <-> our transformer's `model.*` keys.

Import refuses, in one line, anything in a config that would change the computation and that
our model does not implement (another architecture or activation, an unknown RoPE scaling, a
partial rotary embedding, per-layer attention types other than full / sliding). Nothing is
silently ignored. Keys that do not change the computation (dropout, `use_cache`,
`pretraining_tp`, initializer range, ids of special tokens) are not read.

Sliding windows: a window of W tokens attends to keys less than W positions back, which for
sequences of at most W tokens is exactly full causal attention. So a sliding window caps
`model.max_seq_len` at W (the model refuses longer sequences) instead of being refused: Mistral
7B v0.1 (window 4096) imports and runs exactly, up to 4096 tokens.

`read_hf_config` reads a model directory's `config.json` (`is_hf_dir`: a transformers config,
not one of our runs').

Both spellings of RoPE settings are read: released checkpoints' `rope_theta` + `rope_scaling`,
and transformers 5's `rope_parameters`. Export writes the released spelling (which transformers
5, vLLM and older readers all accept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from infra import paths
from infra.errors import UserError

# architecture -> (model_type, default of tie_word_embeddings in its transformers config class)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", False),
    "MistralForCausalLM": ("mistral", False),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
    "MixtralForCausalLM": ("mixtral", False),
    "Qwen3MoeForCausalLM": ("qwen3_moe", False),
}
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
# model.* keys that define the architecture (the weights' meaning); the rest are run choices.
ARCHITECTURE_KEYS = (
    "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
    "rope_theta", "norm_eps", "tie_embeddings", "qkv_bias", "out_bias", "mlp_bias", "qk_norm",
    "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
    "rope_original_max_len", "num_experts", "experts_per_token", "moe_intermediate_size",
    "moe_every", "dense_layers", "norm_topk_prob", "shared_experts",
)


class HFConfigError(UserError):
    """A Hugging Face config that we cannot run exactly."""


def read_hf_config(hf_dir: Path) -> dict:
    """The `config.json` of the Hugging Face model directory `hf_dir` (UserError naming what is
    wrong otherwise)."""
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise UserError(f"{hf_dir} is not a directory; pass a Hugging Face model directory")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file; pass a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no config.json in {hf_dir}; pass a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a model config")
    return raw


def is_hf_dir(path: str | Path) -> bool:
    """A directory whose config.json is a transformers config (not one of our runs')."""
    config = paths.path(path) / "config.json"
    if paths.special_file(config):
        return False
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError, UserError):
        return False
    return isinstance(raw, dict) and "architectures" in raw and "task" not in raw


def _rope(hf: dict, where: str) -> dict[str, Any]:
    """RoPE keys from either spelling (`rope_parameters`, or `rope_theta` + `rope_scaling`)."""
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and params and not ("rope_type" in params or "type" in params
                                                    or "rope_theta" in params):
        raise HFConfigError(f"{where}: per-layer-type rope_parameters are not supported; "
                            "use a model with one RoPE setting")
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if float(hf.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HFConfigError(f"{where}: partial_rotary_factor "
                            f"{hf.get('partial_rotary_factor', merged.get('partial_rotary_factor'))}"
                            " is not supported (our RoPE rotates the whole head)")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out | {"rope_scaling": "none"}
    if kind == "llama3":
        try:
            return out | dict(
                rope_scaling="llama3", rope_factor=float(merged["factor"]),
                rope_low_freq_factor=float(merged["low_freq_factor"]),
                rope_high_freq_factor=float(merged["high_freq_factor"]),
                rope_original_max_len=int(merged["original_max_position_embeddings"]))
        except KeyError as e:
            raise HFConfigError(f"{where}: rope_scaling of type llama3 lacks {e.args[0]!r}; "
                                "the config is incomplete") from None
    raise HFConfigError(f"{where}: rope scaling of type {kind!r} is not supported (supported: "
                        "default, llama3); convert the model or pick another checkpoint")


def _sliding_window(hf: dict, arch: str) -> int | None:
    """The active sliding window, or None (Qwen's `use_sliding_window: false` turns it off)."""
    window = hf.get("sliding_window")
    if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def from_hf(hf: dict, where: str = "config.json") -> dict[str, Any]:
    """The `model.*` values (name included) of a Hugging Face config; HFConfigError for what we
    cannot compute exactly. `where` names the file in messages."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise HFConfigError(f"{where}: architectures {archs} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)}")
    arch = archs[0]
    model_type, tie_default = ARCHITECTURES[arch]
    if hf.get("model_type", model_type) != model_type:
        raise HFConfigError(f"{where}: model_type {hf.get('model_type')!r} does not match "
                            f"architecture {arch} ({model_type!r})")
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        raise HFConfigError(f"{where}: hidden_act {act!r} is not supported (SwiGLU with silu only)")
    layer_types = set(hf.get("layer_types") or [])
    if layer_types - {"full_attention", "sliding_attention"}:
        raise HFConfigError(f"{where}: layer_types {sorted(layer_types)} are not supported "
                            "(full_attention and sliding_attention only)")
    try:
        heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        values = dict(
            name="transformer",
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or d_model // heads),
            mlp_dim=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
        )
    except KeyError as e:
        raise HFConfigError(f"{where}: required key {e.args[0]!r} is missing; is this a "
                            "transformers config.json?") from None
    values |= _rope(hf, where)
    bias = bool(hf.get("attention_bias", False))
    values |= dict(qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                   qk_norm=False)
    if arch == "Qwen2ForCausalLM":
        values |= dict(qkv_bias=True, out_bias=False, mlp_bias=False)
    elif arch == "Qwen3ForCausalLM":
        values |= dict(qk_norm=True, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        values |= dict(qkv_bias=False, out_bias=False, mlp_bias=False)
    if arch in MOE_ARCHITECTURES:
        values |= _experts(hf, arch, where, values["mlp_dim"])
    values.setdefault("num_experts", 0)
    window = _sliding_window(hf, arch)
    if window is not None and window < values["max_seq_len"]:
        values["max_seq_len"] = window  # exact up to the window (see the module docstring)
    return values


def _experts(hf: dict, arch: str, where: str, intermediate: int) -> dict[str, Any]:
    """The mixture-of-experts keys of a Mixtral or Qwen3-MoE config. Their routers: softmax over
    all experts in float32, the top k, renormalised (always for Mixtral; `norm_topk_prob` for
    Qwen3-MoE), as ours. The load-balancing loss is trained only with `output_router_logits`."""
    if float(hf.get("router_jitter_noise") or 0.0):
        raise HFConfigError(f"{where}: router_jitter_noise {hf['router_jitter_noise']} is not "
                            "supported (routers without noise only)")
    aux = float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0
    try:
        if arch == "MixtralForCausalLM":
            return dict(qkv_bias=False, out_bias=False, mlp_bias=False,
                        num_experts=int(hf["num_local_experts"]),
                        experts_per_token=int(hf["num_experts_per_tok"]),
                        moe_intermediate_size=intermediate, norm_topk_prob=True,
                        router_aux_loss=aux)
        dense = hf.get("mlp_only_layers") or []
        experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        return dict(qk_norm=True, mlp_bias=False, num_experts=int(experts),
                    experts_per_token=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(hf["moe_intermediate_size"]),
                    norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                    moe_every=int(hf.get("decoder_sparse_step", 1)),
                    dense_layers=",".join(str(int(i)) for i in dense), router_aux_loss=aux)
    except KeyError as e:
        raise HFConfigError(f"{where}: required key {e.args[0]!r} of {arch} is missing") from None
    except (TypeError, ValueError):
        raise HFConfigError(f"{where}: the experts' settings of {arch} are malformed") from None


def architecture_for(model: dict[str, Any], preferred: str | None = None) -> str:
    """The transformers architecture that computes what `model` (our `model.*` values) does;
    `preferred` (e.g. the imported checkpoint's) when it is one of them."""
    if model.get("num_experts"):
        return _moe_architecture(model)
    if model["qk_norm"]:
        fits = ["Qwen3ForCausalLM"] if model["qkv_bias"] == model["out_bias"] and not model[
            "mlp_bias"] else []
    elif model["qkv_bias"] and not model["out_bias"]:
        fits = ["Qwen2ForCausalLM"] if not model["mlp_bias"] else []
    elif model["qkv_bias"] == model["out_bias"]:
        fits = ["LlamaForCausalLM"] + (["MistralForCausalLM"] if not (
            model["qkv_bias"] or model["mlp_bias"] or model["rope_scaling"] != "none") else [])
    else:
        fits = []
    if not fits:
        raise UserError("this model's combination of model.qkv_bias, model.out_bias, "
                        "model.mlp_bias and model.qk_norm has no transformers architecture")
    return preferred if preferred in fits else fits[0]


def _moe_architecture(model: dict[str, Any]) -> str:
    if model["shared_experts"]:
        raise UserError("model.shared_experts has no transformers architecture we export "
                        "(Mixtral and Qwen3-MoE have none)")
    if model["qk_norm"] and not model["mlp_bias"] and model["qkv_bias"] == model["out_bias"]:
        return "Qwen3MoeForCausalLM"
    every_layer = model["moe_every"] == 1 and not str(model["dense_layers"]).strip()
    if not (model["qk_norm"] or model["qkv_bias"] or model["out_bias"] or model["mlp_bias"]) \
            and model["norm_topk_prob"] and every_layer:
        return "MixtralForCausalLM"
    raise UserError("this mixture-of-experts model has no transformers architecture: Mixtral "
                    "needs experts in every layer, renormalised top-k and no biases or q/k "
                    "norm; Qwen3-MoE needs q/k norm")


def to_hf(model: dict[str, Any], *, architecture: str, bos_token_id: int | None,
          eos_token_id: int | list[int] | None, dtype: str) -> dict[str, Any]:
    """A transformers `config.json` for `model` (our `model.*` values) as `architecture`."""
    model_type = ARCHITECTURES[architecture][0]
    hf: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": model["vocab_size"],
        "hidden_size": model["d_model"],
        "intermediate_size": model["mlp_dim"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_heads"],
        "num_key_value_heads": model["num_kv_heads"],
        "head_dim": model["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": model["max_seq_len"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "rope_scaling": None,
        "tie_word_embeddings": model["tie_embeddings"],
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if model["rope_scaling"] == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3", "factor": model["rope_factor"],
            "low_freq_factor": model["rope_low_freq_factor"],
            "high_freq_factor": model["rope_high_freq_factor"],
            "original_max_position_embeddings": model["rope_original_max_len"]}
    if architecture == "LlamaForCausalLM":
        hf |= {"attention_bias": model["qkv_bias"], "mlp_bias": model["mlp_bias"]}
    elif architecture == "MistralForCausalLM":
        hf |= {"sliding_window": None}
    elif architecture == "Qwen2ForCausalLM":
        hf |= {"use_sliding_window": False, "sliding_window": None}
    elif architecture == "Qwen3ForCausalLM":
        hf |= {"attention_bias": model["qkv_bias"], "use_sliding_window": False,
               "sliding_window": None}
    elif architecture == "MixtralForCausalLM":
        hf |= {"intermediate_size": model["moe_intermediate_size"] or model["mlp_dim"],
               "num_local_experts": model["num_experts"],
               "num_experts_per_tok": model["experts_per_token"], "sliding_window": None,
               "router_aux_loss_coef": model["router_aux_loss"],
               "output_router_logits": model["router_aux_loss"] > 0, "router_jitter_noise": 0.0}
    elif architecture == "Qwen3MoeForCausalLM":
        dense = [int(i) for i in str(model["dense_layers"]).split(",") if i.strip()]
        hf |= {"attention_bias": model["qkv_bias"], "use_sliding_window": False,
               "sliding_window": None, "num_experts": model["num_experts"],
               "num_experts_per_tok": model["experts_per_token"],
               "moe_intermediate_size": model["moe_intermediate_size"] or model["mlp_dim"],
               "norm_topk_prob": model["norm_topk_prob"],
               "decoder_sparse_step": model["moe_every"], "mlp_only_layers": dense,
               "router_aux_loss_coef": model["router_aux_loss"],
               "output_router_logits": model["router_aux_loss"] > 0}
    return hf
