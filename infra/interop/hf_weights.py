"""Which Hugging Face tensor becomes which of our parameters, and how its layout changes.

HF `nn.Linear.weight` is (out, in); ours are (in, out) with heads split out, so every mapping is
"view the HF tensor with some of its dims split, then permute the dims" (no data changes, no
RoPE permutation: both sides rotate the two halves of each head). A `TensorMap` records that
view: `split` is the HF tensor's shape with dims split (q_proj (H·hd, D) -> (H, hd, D)),
`groups` says which split dims make up each HF dim, and `perm` orders the split dims as ours
(q: (D, H, hd) = split dims (2, 0, 1)). Because the view is only a reshape and a transpose, any
rectangular slice of our parameter is a rectangular slice of the split HF tensor, which is one
contiguous range per HF dim once the inner split dims are whole: that is what lets the loader
read only the slice a device holds (`safetensors_io`).

With `model.scan_layers` a parameter stacks every layer's tensor along a leading `layers` dim:
its `TensorMap` lists one HF name per layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from infra.checkpoint.verify import path_name
from infra.errors import UserError

# Our name inside a block -> HF name inside `model.layers.<i>.`
BLOCK_NAMES = {
    "attn_norm/scale": "input_layernorm.weight",
    "mlp_norm/scale": "post_attention_layernorm.weight",
    "attn/q": "self_attn.q_proj.weight",
    "attn/k": "self_attn.k_proj.weight",
    "attn/v": "self_attn.v_proj.weight",
    "attn/o": "self_attn.o_proj.weight",
    "attn/q_bias": "self_attn.q_proj.bias",
    "attn/k_bias": "self_attn.k_proj.bias",
    "attn/v_bias": "self_attn.v_proj.bias",
    "attn/o_bias": "self_attn.o_proj.bias",
    "attn/q_norm/scale": "self_attn.q_norm.weight",
    "attn/k_norm/scale": "self_attn.k_norm.weight",
    "mlp/gate": "mlp.gate_proj.weight",
    "mlp/up": "mlp.up_proj.weight",
    "mlp/down": "mlp.down_proj.weight",
    "mlp/gate_bias": "mlp.gate_proj.bias",
    "mlp/up_bias": "mlp.up_proj.bias",
    "mlp/down_bias": "mlp.down_proj.bias",
}
# Experts' names inside `model.layers.<i>.`, by architecture; `{e}`: the expert
EXPERT_NAMES = {
    "MixtralForCausalLM": {"moe/router": "block_sparse_moe.gate.weight",
                           "moe/gate": "block_sparse_moe.experts.{e}.w1.weight",
                           "moe/up": "block_sparse_moe.experts.{e}.w3.weight",
                           "moe/down": "block_sparse_moe.experts.{e}.w2.weight"},
    "Qwen3MoeForCausalLM": {"moe/router": "mlp.gate.weight",
                            "moe/gate": "mlp.experts.{e}.gate_proj.weight",
                            "moe/up": "mlp.experts.{e}.up_proj.weight",
                            "moe/down": "mlp.experts.{e}.down_proj.weight"},
}
_TOP = {
    "embedding": "model.embed_tokens.weight",
    "final_norm/scale": "model.norm.weight",
    "unembedding": "lm_head.weight",
}
# HF tensors that carry nothing (recomputed buffers of old checkpoints), or that a tied model may
# hold as a copy of the embedding.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
TIED_COPY = "lm_head.weight"


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our parameters (`path`, `shape`) as a view of HF tensor(s) `names`."""

    path: str  # e.g. "blocks/0/attn/q" (our pure-dict path)
    names: tuple[str, ...]  # one HF tensor, or one per layer (scan_layers)
    hf_shape: tuple[int, ...]  # each HF tensor's shape
    split: tuple[int, ...]  # hf_shape with dims split
    groups: tuple[tuple[int, ...], ...]  # split dims of each HF dim, in order
    perm: tuple[int, ...]  # ours (without the stacked dims) = split.transpose(perm)
    # leading dims over `names` (row-major): layers (scan_layers), experts, or both
    stack: tuple[int, ...] = ()

    @property
    def stacked(self) -> bool:
        return bool(self.stack)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack + tuple(self.split[p] for p in self.perm)

    def names_of(self, index: tuple[int, ...]) -> tuple[str, ...]:
        """The names under the leading `index` into the stacked dims (all: `()`), in order."""
        inner = math.prod(self.stack[len(index):])
        start = int(np.ravel_multi_index(index, self.stack[:len(index)])) * inner if index else 0
        return self.names[start:start + inner]

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        """A whole HF tensor in our layout (one layer's, when stacked)."""
        return hf.reshape(self.split).transpose(self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our (one layer's) array in the HF layout."""
        return ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

    def hf_slices(self, index: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """For a rectangular `index` into our (per-layer) parameter: (slices of the HF tensor to
        read, slices to apply to that read after reshaping it to its split dims); the result
        then takes `perm` to become our slice."""
        split_index: list[slice] = [slice(None)] * len(self.split)
        for ours_dim, split_dim in enumerate(self.perm):
            split_index[split_dim] = index[ours_dim]
        read, after = [], []
        for group in self.groups:
            outer = split_index[group[0]]
            start, stop, _ = outer.indices(self.split[group[0]])
            inner = math.prod(self.split[d] for d in group[1:])
            read.append(slice(start * inner, stop * inner))
            after.append(slice(None))
            after.extend(split_index[d] for d in group[1:])
        return tuple(read), tuple(after)

    def read_shape(self, read: tuple[slice, ...]) -> tuple[int, ...]:
        """Split shape of the HF slice `read` (as `hf_slices` returns it)."""
        out: list[int] = []
        for group, s in zip(self.groups, read):
            inner = math.prod(self.split[d] for d in group[1:])
            out.append((s.stop - s.start) // inner)
            out.extend(self.split[d] for d in group[1:])
        return tuple(out)


def _linear(out_dims: tuple[int, ...], in_dims: tuple[int, ...], *, in_first: bool):
    """(split, groups, perm) of an HF (out, in) weight whose out dim is `out_dims` split and in
    dim `in_dims` split; ours is (in..., out...) when `in_first`."""
    split = out_dims + in_dims
    groups = (tuple(range(len(out_dims))), tuple(range(len(out_dims), len(split))))
    outs, ins = groups
    perm = (ins + outs) if in_first else (outs + ins)
    return split, groups, perm


def _layout(name: str, shape: tuple[int, ...]):
    """(hf_shape, split, groups, perm) of our per-layer parameter `name` of `shape`."""
    if name in ("attn/q", "attn/k", "attn/v"):  # ours (D, H, hd) <- HF (H·hd, D)
        d, h, hd = shape
        split, groups, perm = _linear((h, hd), (d,), in_first=True)
        return (h * hd, d), split, groups, perm
    if name == "attn/o":  # ours (H, hd, D) <- HF (D, H·hd)
        h, hd, d = shape
        split, groups, perm = _linear((d,), (h, hd), in_first=True)
        return (d, h * hd), split, groups, perm
    if name in ("attn/q_bias", "attn/k_bias", "attn/v_bias"):  # ours (H, hd) <- HF (H·hd,)
        h, hd = shape
        return (h * hd,), (h, hd), ((0, 1),), (0, 1)
    if name in ("mlp/gate", "mlp/up", "mlp/down", "unembedding", "moe/router", "moe/gate",
                "moe/up", "moe/down"):  # ours (in, out) <- HF (out, in); an expert's alike
        i, o = shape
        return (o, i), (o, i), ((0,), (1,)), (1, 0)
    return shape, shape, tuple((d,) for d in range(len(shape))), tuple(range(len(shape)))


def run_maps(abstract_params: Any, model: dict) -> list[TensorMap]:
    """`tensor_maps` of a run whose `model.*` values are `model` (the experts named as the
    architecture `hf export` writes them as)."""
    from infra.interop.hf_config import architecture_for

    architecture = architecture_for(model) if model.get("num_experts") else "LlamaForCausalLM"
    return tensor_maps(abstract_params, model["num_layers"], architecture)


def tensor_maps(abstract_params: Any, num_layers: int, architecture: str = "LlamaForCausalLM"
                ) -> list[TensorMap]:
    """A `TensorMap` for every leaf of our parameter tree (pure dict of arrays or
    ShapeDtypeStructs), in tree order; `blocks/<i>/...` (loop layout) or `blocks/...` with a
    leading layers dim (scan layout). An expert weight (E, in, out) stacks the experts' HF
    tensors of `architecture` (after the layers, with scan_layers)."""
    out = []
    names_in_layer = {**BLOCK_NAMES, **EXPERT_NAMES.get(architecture, {})}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name = path_name(path)
        shape = tuple(leaf.shape)
        parts = name.split("/")
        if parts[0] != "blocks":
            inner, names, stack = name, (_TOP[name],), ()
        else:
            loop = len(parts) > 1 and parts[1].isdigit()
            inner = "/".join(parts[2:] if loop else parts[1:])
            if inner not in names_in_layer:
                raise UserError(f"{architecture} has no tensor name for {name}")
            layers = [int(parts[1])] if loop else list(range(num_layers))
            stack = () if loop else (num_layers,)
            hf = names_in_layer[inner]
            experts = [None]
            if "{e}" in hf:  # one tensor per expert
                experts = list(range(shape[len(stack)]))
                stack += (len(experts),)
            names = tuple(f"model.layers.{i}.{hf.format(e=e)}" for i in layers for e in experts)
            shape = shape[len(stack):]
        hf_shape, split, groups, perm = _layout(inner, shape)
        out.append(TensorMap(name, names, hf_shape, split, groups, perm, stack))
    return out
