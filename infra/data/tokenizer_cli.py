"""`python -m infra tokenizer train` (a byte-level BPE on your text, offline) and
`python -m infra tokenize` (a corpus -> memory-mapped token files, `infra.data.token_file`).

    python -m infra tokenizer train --files 'docs/**/*.md' --vocab_size 16384 --out tok.json
    python -m infra tokenize --tokenizer tok.json --files 'docs/**/*.md' --out data/docs-tok

`tokenizer train` uses Hugging Face `tokenizers` (ByteLevel pre-tokenizer and decoder, so any
text round-trips exactly) with special tokens `<|pad|>`, `<|bos|>`, `<|eos|>` (ids 0, 1, 2). It
writes the `tokenizer.json` and, beside it, a `tokenizer_config.json` naming them, so `data.tokenizer=
tok.json` (or the directory) finds BOS / EOS; the default corpus is the Python standard library's
source, as for byte-level training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from infra.errors import UserError

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")


def train_bpe(files: list[str], vocab_size: int, out: str | Path, *, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE on `files`; write `out` (tokenizer.json) and its tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIALS):
        raise UserError(f"--vocab_size must be at least {256 + len(SPECIALS)} (256 bytes and "
                        f"{len(SPECIALS)} special tokens), got {vocab_size}")
    out = Path(out)
    if out.suffix != ".json":
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    tok.save(str(out))
    pad, bos, eos = SPECIALS
    (out.parent / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": pad,
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}, indent=2) + "\n")
    return out


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on local text")
    t.add_argument("--files", default="", help="comma-separated globs (default: the Python stdlib)")
    t.add_argument("--vocab_size", type=int, default=16384)
    t.add_argument("--min_frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="tokenizer.json to write (or a directory)")


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", default="", help="comma-separated globs (default: the Python stdlib)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json or directory; \"\" = bytes")
    p.add_argument("--out", required=True, help="directory to write (resumes an unfinished one)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU)")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="the held-out split's seed (train.seed)")


def run_train_cli(args) -> int:
    from infra.data.text import resolve_files

    files = resolve_files(args.files)
    start = time.perf_counter()
    out = train_bpe(files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(f"trained a {args.vocab_size}-token byte-level BPE on {len(files)} files in "
          f"{time.perf_counter() - start:.1f} s -> {out}")
    return 0


def run_tokenize_cli(args) -> int:
    from infra.data.text import resolve_files
    from infra.data.token_file import build_token_dir

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    files = resolve_files(args.files)
    index = build_token_dir(files, args.tokenizer, args.out, val_fraction=args.val_fraction,
                            seed=args.seed, workers=args.workers)
    tokens = sum(s["tokens"] for s in index["splits"].values())
    secs = index.get("seconds") or 0
    rate = f", {tokens / secs:,.0f} tokens/s" if secs else ""
    print(f"{tokens:,} tokens ({index['splits']['train']['tokens']:,} train, "
          f"{index['splits']['val']['tokens']:,} held out) from {index['files']} files in "
          f"{secs:.1f} s{rate} -> {args.out}")
    return 0
