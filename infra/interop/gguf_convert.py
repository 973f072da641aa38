"""GGUF in: a llama.cpp model file -> a Hugging Face model directory that `hf import` reads.

`python -m infra hf import model.gguf --workdir W` converts the file into a temporary directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json) and imports that, so a
GGUF model goes through the same checks, streaming and staging as any other import.

* Weights: every tensor dequantized to float32 with the `gguf` package (`pip install
  'infra[gguf]'`): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants; written one
  tensor at a time. llama.cpp stores q and k with their rotary halves interleaved per head (its
  converter permutes them); that permutation is undone.
* Config: from the file's `llama.*` metadata; the embedding is tied when there is no
  `output.weight`.
* Tokenizer: a byte-level BPE (`tokenizer.ggml.model` = gpt2) built from the file's tokens and
  merges with the `tokenizers` library: the pre-tokenizer's split the vocabulary was learned
  with (`tokenizer.ggml.pre`), control tokens as special tokens, BOS added to a text only where
  the file says so (`add_bos_token`), its BOS / EOS / PAD and chat template.

A file that is not GGUF, is truncated, holds another architecture or tokenizer, a quantization
the `gguf` package cannot dequantize, or tensors whose shapes contradict its metadata is refused
in one line (exit 2) before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from infra.errors import UserError
from infra.interop.safetensors_write import write_safetensors

ARCHITECTURES = ("llama",)
# GGUF tensor name (per block: `blk.N.`) -> Hugging Face Llama name
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
               "attn_v.weight": "self_attn.v_proj.weight",
               "attn_output.weight": "self_attn.o_proj.weight",
               "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
               "ffn_down.weight": "mlp.down_proj.weight",
               "attn_norm.weight": "input_layernorm.weight",
               "ffn_norm.weight": "post_attention_layernorm.weight"}
# `tokenizer.ggml.pre` -> the split regex its vocabulary was learned with (absent: GPT-2's)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT,
              "smaug-bpe": LLAMA3_SPLIT, "dbrx": LLAMA3_SPLIT}
CONTROL, USER_DEFINED = 3, 4


# what the `gguf` package dequantizes to float (integer tensors are not weights)
FLOAT_TYPES = ("F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
               "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL",
               "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4")


def is_gguf(path: str | Path) -> bool:
    """A file named .gguf, or starting with GGUF's magic."""
    path = Path(path)
    if not path.is_file() or path.is_fifo():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise UserError("importing a GGUF file needs the gguf package: pip install "
                        "'infra[gguf]' (or pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or malformed file, as gguf reports it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path} is not a readable GGUF file ({first}); pass an intact .gguf "
                        "file") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:  # noqa: BLE001 - a field whose value does not parse
        raise UserError(f"GGUF metadata {key} cannot be read; the file is damaged") from None


def read_metadata(reader, path: Path) -> dict:
    """The model's shape from `llama.*` metadata (UserError naming what is missing or wrong)."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path} holds a {arch!r} model; GGUF import supports "
                        f"{', '.join(ARCHITECTURES)} (Llama-architecture) files")
    meta = {}
    for name, key in (("layers", "block_count"), ("d_model", "embedding_length"),
                      ("mlp", "feed_forward_length"), ("heads", "attention.head_count"),
                      ("kv_heads", "attention.head_count_kv"), ("context", "context_length")):
        value = _field(reader, f"{arch}.{key}")
        if name == "kv_heads" and value is None:
            value = meta["heads"]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: GGUF metadata {arch}.{key} is {value!r}, not a positive "
                            "integer; the file is damaged or not a Llama model")
        meta[name] = value
    if meta["d_model"] % meta["heads"] or meta["heads"] % meta["kv_heads"]:
        raise UserError(f"{path}: {meta['heads']} heads of {meta['kv_heads']} kv heads do not "
                        f"divide the width {meta['d_model']}; the metadata is inconsistent")
    meta["head_dim"] = _field(reader, f"{arch}.attention.key_length",
                              meta["d_model"] // meta["heads"])
    meta["rope_theta"] = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    meta["eps"] = float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise UserError(f"{path} has no tokenizer (tokenizer.ggml.tokens); pass a GGUF file "
                        "with its vocabulary")
    meta["vocab"] = len(tokens)
    return meta


def _expected_shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    d, hd, v = meta["d_model"], meta["head_dim"], meta["vocab"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,),
              "lm_head.weight": (v, d)}
    per = {"self_attn.q_proj.weight": (meta["heads"] * hd, d),
           "self_attn.k_proj.weight": (meta["kv_heads"] * hd, d),
           "self_attn.v_proj.weight": (meta["kv_heads"] * hd, d),
           "self_attn.o_proj.weight": (d, meta["heads"] * hd),
           "mlp.gate_proj.weight": (meta["mlp"], d), "mlp.up_proj.weight": (meta["mlp"], d),
           "mlp.down_proj.weight": (d, meta["mlp"]),
           "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    for i in range(meta["layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in per.items()})
    return shapes


def _hf_name(name: str) -> str | None:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    return None


def _tensors(reader, meta: dict, path: Path) -> dict[str, Any]:
    """HF name -> the GGUF tensor, every shape checked against the metadata."""
    import gguf

    expected, out = _expected_shapes(meta), {}
    dequantizable = {gguf.GGMLQuantizationType[n] for n in FLOAT_TYPES
                     if n in gguf.GGMLQuantizationType.__members__}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):
                continue  # llama.cpp's precomputed RoPE factors: the config carries them
            raise UserError(f"{path}: unknown tensor {t.name!r} for a Llama model")
        if t.tensor_type not in dequantizable:
            raise UserError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which "
                            "the gguf package cannot dequantize")
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != expected[name]:
            raise UserError(f"{path}: tensor {t.name} has shape {shape} but the metadata "
                            f"describes {expected[name]}; the file is inconsistent")
        out[name] = t
    missing = [n for n in expected if n not in out and n != "lm_head.weight"]
    if missing:
        raise UserError(f"{path}: tensor for {missing[0]} is missing ({len(missing)} missing); "
                        "the file is incomplete")
    return out


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q or k weight (rows: heads x head_dim)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_values(t, name: str, meta: dict) -> np.ndarray:
    import gguf

    values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    values = values.reshape(tuple(int(n) for n in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
        values = _unpermute(values, meta["heads"])
    elif name.endswith("k_proj.weight"):
        values = _unpermute(values, meta["kv_heads"])
    return values


def _hf_config(reader, meta: dict, tied: bool) -> dict:
    special = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": meta["vocab"], "hidden_size": meta["d_model"],
            "intermediate_size": meta["mlp"], "num_hidden_layers": meta["layers"],
            "num_attention_heads": meta["heads"], "num_key_value_heads": meta["kv_heads"],
            "head_dim": meta["head_dim"], "max_position_embeddings": meta["context"],
            "rms_norm_eps": meta["eps"], "rope_theta": meta["rope_theta"],
            "tie_word_embeddings": tied, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "torch_dtype": "float32",
            "bos_token_id": special["bos"], "eos_token_id": special["eos"],
            "pad_token_id": special["padding"]}


def _tokenizer(reader, path: Path):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the file's `tokenizer.*` metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{path} has a {kind!r} tokenizer; GGUF import builds byte-level BPE "
                        "(gpt2) tokenizers")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = _byte_spelling()
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    split = PRE_SPLITS.get(_field(reader, "tokenizer.ggml.pre"))
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else
                         pre_tokenizers.Sequence([
                             pre_tokenizers.Split(Regex(split), behavior="isolated"),
                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types)
                            if kind == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    names = {k: (tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None)
             for k, i in (("bos", _field(reader, "tokenizer.ggml.bos_token_id")),
                          ("eos", _field(reader, "tokenizer.ggml.eos_token_id")),
                          ("pad", _field(reader, "tokenizer.ggml.padding_token_id")))}
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and names["bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{names['bos']} $A", pair=f"{names['bos']} $A $B:1",
            special_tokens=[(names["bos"], vocab[names["bos"]])])
    config = {"bos_token": names["bos"], "eos_token": names["eos"], "pad_token": names["pad"],
              "tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": 1 << 30}
    template = _field(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return tok, config


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table (how byte-level vocabularies spell bytes)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def convert(path: str | Path, out: Path) -> Path:
    """Write the HF directory of the GGUF file `path` into the (new, empty) directory `out`."""
    path = Path(path).expanduser()
    reader = _reader(path)
    meta = read_metadata(reader, path)
    tensors = _tensors(reader, meta, path)
    tok, tok_config = _tokenizer(reader, path)
    tied = "lm_head.weight" not in tensors
    out.mkdir(parents=True, exist_ok=True)
    entries = [(name, "F32", _expected_shapes(meta)[name]) for name in tensors]
    write_safetensors(out, entries, lambda name: _tensor_values(tensors[name], name, meta),
                      max_shard_bytes=5 * 10**9)
    (out / "config.json").write_text(json.dumps(_hf_config(reader, meta, tied), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out
