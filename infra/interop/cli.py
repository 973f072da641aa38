"""`python -m infra hf import <hf_dir> --workdir <w> [--config <experiment>] [--config.k=v ...]`
and `python -m infra hf export --workdir <w> --out <dir> [--step N] [--dtype bfloat16]
[--merge_lora | --peft]`."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="hf_command", required=True)
    i = sub.add_parser("import", help="a Hugging Face model directory -> a new workdir")
    i.add_argument("hf_dir", help="local directory with config.json, *.safetensors, tokenizer; "
                                  "or a Llama-architecture .gguf file")
    i.add_argument("--workdir", required=True, help="new workdir to create")
    i.add_argument("--config", default=None,
                   help="experiment whose train/data/mesh settings to use (its model must match)")
    i.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    e = sub.add_parser("export", help="a run's checkpoint -> a Hugging Face model directory")
    e.add_argument("--workdir", required=True, help="workdir of a run (or an import)")
    e.add_argument("--out", required=True, help="new directory to write")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    e.add_argument("--dtype", default="auto", help="auto (= model.param_dtype), float32, "
                                                   "bfloat16 or float16")
    e.add_argument("--max_shard_size", default="5GB", help="shard the weights above this size")
    e.add_argument("--merge_lora", action="store_true",
                   help="LoRA runs: fold the adapters into the weights (base + alpha/rank * A B)")
    e.add_argument("--peft", action="store_true",
                   help="LoRA runs: write the adapters only, in PEFT's format "
                        "(adapter_config.json + adapter_model.safetensors)")
    e.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_cli(args, overrides: list[str]) -> int:
    import jax

    from infra.errors import UserError

    if args.hf_command == "import":
        from infra.interop.importer import import_hf

        stats: dict = {}
        workdir = import_hf(args.hf_dir, args.workdir, spec=args.config, overrides=overrides,
                            stats=stats)
        # every process reads only the slices its devices hold
        print(f"process {jax.process_index()} of {jax.process_count()}: read "
              f"{stats['bytes_read'] / 2**20:.2f} MiB of the checkpoint's "
              f"{stats['bytes_total'] / 2**20:.2f} MiB", flush=True)
        if jax.process_index() == 0:
            print(f"imported {args.hf_dir} -> {workdir}")
        return 0
    if overrides:
        raise UserError("--config.* overrides apply to `hf import`, not `hf export`")
    from infra.interop.exporter import export_hf
    from infra.interop.safetensors_write import parse_size

    out = export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype,
                    max_shard_size=parse_size(args.max_shard_size), merge_lora=args.merge_lora,
                    peft=args.peft)
    if jax.process_index() == 0:
        print(f"exported {args.workdir} -> {out}")
    return 0
