"""Hugging Face interop: Llama-family checkpoints in and out, streamed onto shardings.

| module | job |
|---|---|
| `hf_config.py` | HF `config.json` <-> our `model.*` keys; refuses what we do not compute exactly |
| `hf_weights.py` | HF tensor names and layouts <-> our parameter tree (per-tensor views) |
| `safetensors_io.py` | read only each device's slice (positioned reads), headers checked first |
| `safetensors_write.py` | write save_pretrained-style shards and the index, one tensor at a time |
| `importer.py` / `exporter.py` | HF directory -> workdir (step-0 params checkpoint) and back |
| `gguf_convert.py` | a llama.cpp GGUF file -> the HF directory it stands for (weights dequantized, config, tokenizer) |
| `init_from.py` | `init.from`: start a run from a workdir's or an HF directory's parameters |
| `cli.py` | `python -m infra hf import|export` |

Importing this package imports neither torch nor transformers, nor JAX.
"""
