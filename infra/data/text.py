"""Byte-level tokenizer and a packed text corpus read from local files."""
from __future__ import annotations

import codecs
import glob
import hashlib
import os
import sysconfig
from collections.abc import Sequence

import numpy as np

from infra import paths
from infra.errors import DataError

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 token ids (0..255)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Token ids back to text; special tokens are dropped, bad UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


def default_corpus_files() -> list[str]:
    """The standard library's own top-level `.py` files: real text on every machine."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def resolve_files(pattern: str, option: str = "data.files") -> list[str]:
    """`""` → default corpus; else comma-separated globs (`**` recursive), sorted.

    Directories matched by a wildcard are skipped; a directory named literally is kept
    (so reading it reports the problem). `option` is what names the pattern in the error: the
    config key, or a command's own flag (`--files`).
    """
    if not pattern.strip():
        return default_corpus_files()
    files: set[str] = set()
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        if paths.is_remote(part):  # gs://bucket/dir/*.txt (one level per `*`: no `**`)
            files.update(_remote_glob(part, option))
            continue
        literal = glob.escape(part) == part
        files.update(m for m in glob.glob(os.path.expanduser(part), recursive=True)
                     if literal or not os.path.isdir(m))
    if not files:
        raise DataError(f"{option} matched no files: {pattern!r}; pass an existing glob",
                        key=option, value="'docs/**/*.txt'", verb="e.g.")
    return sorted(files)


def _remote_glob(pattern: str, option: str) -> list[str]:
    """Files in a bucket matching `pattern` (the file itself when it names one)."""
    if "**" in pattern:
        raise DataError(f"{option} {pattern!r}: a bucket glob takes `*`, not `**`; list the "
                        "levels, e.g. gs://bucket/corpus/*/*.txt")
    if not glob.has_magic(pattern):
        return [pattern] if paths.path(pattern).exists() else []
    base, _, rest = pattern.partition("*")
    root = paths.path(base.rsplit("/", 1)[0])
    return [str(m) for m in root.glob(pattern[len(str(root)) + 1:]) if not m.is_dir()]


def _unreadable(path: str, e: OSError, option: str) -> DataError:
    return DataError(f"cannot read data file {path!r}: {e.strerror or e}; check {option} points "
                     "at readable text files")


def _open_local(path: str, option: str):
    """`path` opened for reading, or the DataError (naming `option`) that says why it cannot be."""
    try:
        if paths.special_file(path):  # a FIFO or device blocks or never ends
            raise DataError(f"data file {path!r} is not a regular file; point {option} at "
                            "text files")
        return open(path, "rb")
    except OSError as e:
        raise _unreadable(path, e, option) from None


def read_file(path: str, option: str = "data.files") -> bytes:
    """The bytes of data file `path` (local or in a bucket); DataError naming `option` if it
    cannot be read."""
    try:
        if paths.is_remote(path):
            return paths.path(path).read_bytes()
        with _open_local(path, option) as f:
            return f.read()
    except OSError as e:
        raise _unreadable(path, e, option) from None


def check_files(files: Sequence[str], option: str = "data.files", *, utf8: bool = False) -> None:
    """DataError naming the first of the local `files` that cannot be read (or, with `utf8`, is
    not UTF-8 text): checked before a long job starts rather than half-way through it. The
    UTF-8 check reads each file once, in bounded chunks."""
    for path in (f for f in files if not paths.is_remote(f)):
        with _open_local(path, option) as f:
            if utf8 and not _is_utf8(f, path, option):
                raise DataError(f"data file {path!r} is not UTF-8 text (a binary file?); point "
                                f"{option} at text files")


def _is_utf8(f, path: str, option: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        while chunk := f.read(1 << 20):
            decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    except OSError as e:
        raise _unreadable(path, e, option) from None
    return True


def held_out_files(files: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """Deterministic held-out subset: files ranked by a hash of (seed, basename)."""
    if len(files) < 2 or val_fraction <= 0:
        return set()
    k = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    key = lambda f: hashlib.sha256(f"{seed}:{os.path.basename(f)}".encode()).digest()
    return set(sorted(files, key=key)[:k])


def _pack(docs: list[bytes]) -> np.ndarray:
    parts = []
    for d in docs:
        parts += [np.array([BOS_ID], np.uint16), np.frombuffer(d, np.uint8).astype(np.uint16),
                  np.array([EOS_ID], np.uint16)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def load_corpus(files: Sequence[str], *, val_fraction: float, seed: int,
                pattern: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read `files` as bytes and pack them into (train, val) uint16 token arrays.

    Each non-empty document becomes `[BOS] + bytes + [EOS]`. Validation holds out whole
    files (about `val_fraction` of them, at least one if there are ≥ 2); with a single
    file it holds out the last `val_fraction` of its bytes. `pattern` only names the
    files in error messages.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    texts = {f: read_file(f) for f in files}
    if not any(texts.values()):
        name = pattern if pattern is not None else ",".join(files[:3]) + (
            f",… ({len(files)} files)" if len(files) > 3 else "")
        raise DataError(f"data files {name!r} hold no text; point data.files at non-empty "
                        "text files (or leave it empty for the default corpus)")
    if len(files) == 1:
        data = texts[files[0]]
        cut = len(data) - int(len(data) * val_fraction)
        return _pack([data[:cut]]), _pack([data[cut:]] if cut < len(data) else [])
    val = held_out_files(files, val_fraction, seed)
    train_docs = [t for f, t in texts.items() if f not in val and t]
    val_docs = [t for f, t in texts.items() if f in val and t]
    return _pack(train_docs), _pack(val_docs)
