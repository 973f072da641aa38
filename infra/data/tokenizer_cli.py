"""`python -m infra tokenizer train` (a byte-level BPE on your text, offline) and
`python -m infra tokenize` (a corpus -> memory-mapped token files, `infra.data.token_file`).

    python -m infra tokenizer train --files 'docs/**/*.md' --vocab_size 16384 --out tok.json
    python -m infra tokenize --tokenizer tok.json --files 'docs/**/*.md' --out data/docs-tok

`tokenizer train` uses Hugging Face `tokenizers` (ByteLevel pre-tokenizer and decoder, so any
text round-trips exactly) with special tokens `<|pad|>`, `<|bos|>`, `<|eos|>` (ids 0, 1, 2). It
writes the `tokenizer.json` and, beside it, a `tokenizer_config.json` naming them, so `data.tokenizer=
tok.json` (or the directory) finds BOS / EOS; the default corpus is the Python standard library's
source, as for byte-level training. Existing files are replaced only with `--overwrite`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import NamedTuple

from infra.errors import UserError, output_error

SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>")
MIN_VOCAB_SIZE = 256 + len(SPECIALS)
# Token files hold uint32 ids; the largest vocabularies in use have about 256k tokens. The BPE
# trainer allocates for the vocabulary it is asked for up front, so a typo must not reach it.
MAX_VOCAB_SIZE = 2**21
MAX_MIN_FREQUENCY = 2**32 - 1
CONFIG_FILE = "tokenizer_config.json"


class TrainedBPE(NamedTuple):
    """What `train_bpe` wrote: the tokenizer.json, its tokenizer_config.json, the real size."""

    path: Path
    config: Path
    vocab_size: int


def train_bpe(files: list[str], vocab_size: int, out: str | Path, *, min_frequency: int = 2,
              overwrite: bool = False) -> TrainedBPE:
    """Train a byte-level BPE on `files`; write `out` (tokenizer.json) and its tokenizer_config.

    Everything that can be wrong is refused before training (one `UserError`): the sizes, files
    that are not UTF-8 text, an output that exists (unless `overwrite`) or cannot be written.
    Both files are written whole or not at all. The vocabulary is smaller than `vocab_size` when
    the corpus has no more pairs that occur `min_frequency` times."""
    _check_train_arguments(vocab_size, min_frequency)
    from infra import paths
    from infra.data import text

    files = [str(paths.localize(f)) for f in files]  # the trainer reads local files only
    text.check_files(files, "--files", utf8=True)
    tokenizer_json, config_json = _output_files(out, overwrite)
    with _Staged(tokenizer_json.parent) as staged:
        staged.open(tokenizer_json, config_json)  # can these be written at all? before training
        tok = _train(files, vocab_size, min_frequency)
        pad, bos, eos = SPECIALS
        staged.write(tokenizer_json, tok.to_str(pretty=True))
        staged.write(config_json, json.dumps(
            {"bos_token": bos, "eos_token": eos, "pad_token": pad,
             "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30},
            indent=2) + "\n")
    return TrainedBPE(tokenizer_json, config_json, tok.get_vocab_size(with_added_tokens=True))


def _check_train_arguments(vocab_size: int, min_frequency: int) -> None:
    """UserError unless the BPE trainer can take these sizes."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(f"--vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes and "
                        f"{len(SPECIALS)} special tokens), got {vocab_size}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise UserError(f"--vocab_size must be at most {MAX_VOCAB_SIZE:,} (the largest "
                        f"tokenizers in use have about 256k tokens), got {vocab_size:,}")
    if not 0 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise UserError(f"--min_frequency must be a count from 0 to {MAX_MIN_FREQUENCY:,}, got "
                        f"{min_frequency:,}")


def _output_files(out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """(tokenizer.json, tokenizer_config.json) that `--out` names: a .json file, else a
    directory to write tokenizer.json into. UserError where one is a directory, or exists and
    `overwrite` is not set."""
    out = Path(out).expanduser()
    if out.is_dir() or out.suffix != ".json":
        out = out / "tokenizer.json"
    targets = (out, out.parent / CONFIG_FILE)
    for path in targets:
        if path.is_dir():
            raise UserError(f"{path} is a directory, not a file `tokenizer train` can write; "
                            "pass another --out")
    existing = [str(p) for p in targets if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        one = len(existing) == 1
        raise UserError(f"{' and '.join(existing)} already exist{'s' if one else ''} (tokenizer "
                        f"train writes {out.name} and {CONFIG_FILE} beside it); pass --overwrite "
                        f"to replace {'it' if one else 'them'}, or another --out")
    return targets


def _train(files: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    # texts start with BOS when encoded (Llama 3's convention), as `transformers` encodes them
    bos = SPECIALS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


class _Staged:
    """Files written whole or not at all: each to a temporary name beside it, renamed into place
    when the block ends without error. A failed or interrupted block removes the temporary files
    and the directories it created. A write that fails is `errors.output_error` (for `--out`)."""

    def __init__(self, directory: Path):
        self.directory, self.tmp, self.created = directory, {}, []

    def __enter__(self) -> _Staged:
        missing = [d for d in (self.directory, *self.directory.parents) if not d.exists()]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.created = [d for d in missing if d.exists()]
            self._remove()
            raise output_error(self.directory, e, "--out") from None
        self.created = missing
        return self

    def open(self, *paths: Path) -> None:
        """Create the temporary files of `paths` (empty): the output is writable."""
        for path in paths:
            self.write(path, "")

    def write(self, path: Path, content: str) -> None:
        tmp = self.tmp.setdefault(path, path.with_name(f".{path.name}.tmp"))
        try:
            tmp.write_text(content, encoding="utf-8")
        except OSError as e:
            raise output_error(path, e, "--out") from None

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            try:
                for path, tmp in self.tmp.items():
                    tmp.replace(path)
                return
            except OSError as e:
                self._remove()
                raise output_error(path, e, "--out") from None
        self._remove()

    def _remove(self) -> None:
        for tmp in self.tmp.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        for directory in self.created:  # deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on local text")
    t.add_argument("--files", default="", help="comma-separated globs (default: the Python stdlib)")
    t.add_argument("--vocab_size", type=int, default=16384,
                   help=f"{MIN_VOCAB_SIZE} to {MAX_VOCAB_SIZE:,}")
    t.add_argument("--min_frequency", type=int, default=2)
    t.add_argument("--out", required=True, help="tokenizer.json to write (or a directory); "
                   f"{CONFIG_FILE} goes beside it")
    t.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing tokenizer.json / {CONFIG_FILE}")


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--files", default="", help="comma-separated globs (default: the Python stdlib)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json or directory; \"\" = bytes")
    p.add_argument("--out", required=True, help="directory to write (resumes an unfinished one)")
    p.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU)")
    p.add_argument("--val_fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="the held-out split's seed (train.seed)")


def run_train_cli(args) -> int:
    from infra.data.text import resolve_files

    files = resolve_files(args.files, "--files")
    start = time.perf_counter()
    trained = train_bpe(files, args.vocab_size, args.out, min_frequency=args.min_frequency,
                        overwrite=args.overwrite)
    short = (f" (fewer than the {args.vocab_size:,} asked for: no more pairs occur at least "
             f"--min_frequency={args.min_frequency} times in these files)"
             if trained.vocab_size < args.vocab_size else "")
    print(f"trained a {trained.vocab_size:,}-token byte-level BPE{short} on {len(files)} files "
          f"in {time.perf_counter() - start:.1f} s -> {trained.path}, {trained.config}")
    return 0


def run_tokenize_cli(args) -> int:
    from infra.data.text import resolve_files
    from infra.data.token_file import build_token_dir

    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {args.val_fraction}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 (one per CPU) or more, got {args.workers}")
    files = resolve_files(args.files, "--files")
    index = build_token_dir(files, args.tokenizer, args.out, val_fraction=args.val_fraction,
                            seed=args.seed, workers=args.workers)
    tokens = sum(s["tokens"] for s in index["splits"].values())
    secs = index.get("seconds") or 0
    rate = f", {tokens / secs:,.0f} tokens/s" if secs else ""
    print(f"{tokens:,} tokens ({index['splits']['train']['tokens']:,} train, "
          f"{index['splits']['val']['tokens']:,} held out) from {index['files']} files in "
          f"{secs:.1f} s{rate} -> {args.out}")
    return 0
