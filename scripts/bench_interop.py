"""Interop figures on this machine: streaming-load memory and throughput, tokenisation and loader
rates. Results go to docs/benchmarks.md ("Interop" section).

    python scripts/bench_interop.py                    # all figures (a few minutes, 2 cores)
    python scripts/bench_interop.py --cold             # also drop the page cache (root) to time
                                                       # cold reads of disk and load
    python scripts/bench_interop.py --only load --size_mb 1000 --devices 8

* load: a synthetic Llama-shaped safetensors checkpoint (float32, written with our streaming
  writer: no torch needed) is imported with `load_hf_params` onto a mesh. The load's *transient*
  host memory is measured per tensor: before each tensor the kernel's peak-RSS mark is reset
  (`/proc/self/clear_refs` = 5) and afterwards the peak above the RSS before it is read
  (`VmHWM - VmRSS`). On CPU the "device" arrays are host memory too, so the loaded parameters
  themselves are not transient: they are the model. Throughput = file bytes / load seconds,
  against the disk read rate of the same file (a plain sequential read; cold = after dropping
  the page cache, warm = from the page cache).
* tokenize: a byte-level BPE (16,384) trained on the Python stdlib, then `build_token_dir` over
  the stdlib's top-level sources with 1 and 2 workers: tokens/s.
* loader: tokens/s of the LM task's grain iterator over the memory-mapped token file (global
  batch 32 x 1024, one process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1")
        return True
    except OSError:
        return False


def make_synthetic(directory: Path, *, vocab: int, d_model: int, layers: int, mlp: int,
                   heads: int, seed: int = 0) -> Path:
    """A Llama-architecture HF directory with random float32 weights (config.json + safetensors)."""
    import numpy as np

    from infra.interop.safetensors_write import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    hd = d_model // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": d_model, "intermediate_size": mlp, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": hd,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "hidden_act": "silu"}
    (directory / "config.json").write_text(json.dumps(config))
    entries = [("model.embed_tokens.weight", "F32", (vocab, d_model))]
    for i in range(layers):
        p = f"model.layers.{i}."
        entries += [(p + "input_layernorm.weight", "F32", (d_model,)),
                    (p + "post_attention_layernorm.weight", "F32", (d_model,))]
        entries += [(p + f"self_attn.{n}_proj.weight", "F32", (d_model, d_model)) for n in "qkvo"]
        entries += [(p + "mlp.gate_proj.weight", "F32", (mlp, d_model)),
                    (p + "mlp.up_proj.weight", "F32", (mlp, d_model)),
                    (p + "mlp.down_proj.weight", "F32", (d_model, mlp))]
    entries += [("model.norm.weight", "F32", (d_model,)), ("lm_head.weight", "F32", (vocab, d_model))]
    shapes = {n: s for n, _, s in entries}
    rng = np.random.default_rng(seed)
    write_safetensors(directory, entries,
                      lambda n: rng.standard_normal(shapes[n], dtype=np.float32) * 0.02,
                      max_shard_bytes=10**12)
    return directory


def read_rate(path: Path, *, cold: bool) -> float:
    """Bytes/s of a sequential read of `path` (after dropping the page cache when `cold`)."""
    if cold and not drop_page_cache():
        return float("nan")
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * 2**20):
            pass
    return path.stat().st_size / (time.perf_counter() - start)


def measure_load(hf_dir: Path, *, devices: int, mesh: dict[str, int], cold: bool = False) -> dict:
    """Import `hf_dir`'s parameters onto a mesh of `devices` devices; memory and time figures."""
    import jax
    from ml_collections import ConfigDict

    from infra import config as config_lib
    from infra import mesh as mesh_lib
    from infra.interop.hf_config import from_hf, read_hf_config
    from infra.interop.importer import load_hf_params
    from infra.interop.safetensors_io import SafetensorsDir
    from infra.run import abstract_params

    config = config_lib.base_config("lm")
    config.model.update(from_hf(read_hf_config(hf_dir)))
    config.mesh.update({"data": 1, **mesh})
    config_lib.validate(config)
    m = mesh_lib.make_mesh(ConfigDict(config.mesh.to_dict()), jax.devices()[:devices])
    abstract = abstract_params(config, m)
    ckpt = SafetensorsDir(hf_dir)
    largest = max(math.prod(s) * 4 for _, _, s in ckpt.entries.values())
    file_bytes = sum(p.stat().st_size for p in hf_dir.glob("*.safetensors"))
    if cold:
        drop_page_cache()
    transient = []
    before = {}

    def after_tensor(path: str, array) -> None:
        # peak above the RSS before this tensor, less the tensor's own device buffers (on CPU
        # they are host memory, and they are the model, not transient)
        on_devices = sum(shard.data.nbytes for shard in array.addressable_shards)
        transient.append(_status()["VmHWM"] - before["rss"] - on_devices)
        _reset_peak()
        before["rss"] = _status()["VmRSS"]

    _reset_peak()
    base = before["rss"] = _status()["VmRSS"]
    start = time.perf_counter()
    params = load_hf_params(hf_dir, config, abstract, on_tensor=after_tensor)
    seconds = time.perf_counter() - start
    resident = sum(shard.data.nbytes for leaf in jax.tree.leaves(params)
                   for shard in leaf.addressable_shards)
    return {"devices": devices, "mesh": mesh, "file_bytes": file_bytes,
            "params_bytes_on_devices": resident, "largest_tensor_bytes": largest,
            "peak_transient_bytes": max(transient), "rss_growth_bytes": _status()["VmRSS"] - base,
            "seconds": seconds, "bytes_per_s": file_bytes / seconds, "cold": cold}


def bench_load(args) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-interop-", dir=args.tmp) as tmp:
        mb = args.size_mb
        d_model, layers, mlp = 1024, max(1, round((mb * 2**20 / 4 - 2 * 16000 * 1024) / (12 * 1024**2))), 4096
        hf = make_synthetic(Path(tmp) / "hf", vocab=16000, d_model=d_model, layers=layers,
                            mlp=mlp, heads=8)
        path = hf / "model.safetensors"
        out["disk_read_warm_bytes_per_s"] = read_rate(path, cold=False)
        if args.cold:
            out["disk_read_cold_bytes_per_s"] = read_rate(path, cold=True)
        for devices, mesh in ((1, {}), (args.devices, {"fsdp": args.devices})):
            for cold in ((False, True) if args.cold else (False,)):
                out[f"load_{devices}dev_{'cold' if cold else 'warm'}"] = measure_load(
                    hf, devices=devices, mesh=mesh, cold=cold)
    return out


def bench_tokenize(args) -> dict:
    from infra.data.text import default_corpus_files
    from infra.data.token_file import build_token_dir, open_token_dir
    from infra.data.tokenizer_cli import train_bpe

    out = {}
    files = default_corpus_files()
    with tempfile.TemporaryDirectory(prefix="bench-tok-", dir=args.tmp) as tmp:
        start = time.perf_counter()
        tok = train_bpe(files, 16384, Path(tmp) / "tok.json").path
        out["bpe_train_seconds"] = time.perf_counter() - start
        out["corpus_bytes"] = sum(os.path.getsize(f) for f in files)
        for workers in (1, 2):
            start = time.perf_counter()
            index = build_token_dir(files, str(tok), Path(tmp) / f"tok{workers}", workers=workers,
                                    progress=False, chunk_bytes=1 << 20)
            secs = time.perf_counter() - start
            tokens = sum(s["tokens"] for s in index["splits"].values())
            out[f"tokenize_{workers}_workers"] = {"tokens": tokens, "seconds": secs,
                                                  "tokens_per_s": tokens / secs}
        out["bytes_per_token"] = out["corpus_bytes"] / tokens
        _, arrays = open_token_dir(Path(tmp) / "tok2")
        out["loader"] = bench_loader(arrays["train"])
    return out


def bench_loader(tokens, *, batch: int = 32, seq_len: int = 1024, steps: int = 200) -> dict:
    from infra.data.pipeline import train_iterator

    it = train_iterator(tokens, seq_len=seq_len, global_batch_size=batch, seed=0)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        b = next(it)
    secs = time.perf_counter() - start
    assert b["inputs"].shape == (batch, seq_len)
    return {"batch": batch, "seq_len": seq_len, "steps": steps,
            "tokens_per_s": batch * seq_len * steps / secs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("load", "tokenize"), default=None)
    p.add_argument("--size_mb", type=int, default=1000, help="synthetic checkpoint size")
    p.add_argument("--devices", type=int, default=8, help="emulated CPU devices for the fsdp load")
    p.add_argument("--cold", action="store_true", help="drop the page cache (root) for cold reads")
    p.add_argument("--tmp", default=None, help="where to write the synthetic files")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    results = {}
    if args.only in (None, "load"):
        results["load"] = bench_load(args)
    if args.only in (None, "tokenize"):
        results["tokenize"] = bench_tokenize(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
