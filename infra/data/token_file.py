"""Tokenise a corpus once into memory-mapped token files; read them back as arrays.

`python -m infra tokenize --files '<glob>' --tokenizer <tok> --out <dir> --workers N` writes

    <dir>/train.bin, <dir>/val.bin   every document as [BOS] ids [EOS], concatenated (uint16 when
                                     the vocabulary fits, else uint32), raw little-endian
    <dir>/index.json                 dtype, token and document counts, tokenizer, the plan's hash

The files are split into chunks tokenised by a pool of worker processes; each chunk is written
to `parts/` under a temporary name and renamed when complete, so a killed run resumes where it
stopped (`parts/plan.json` records what is being built: a different plan in the same directory is
refused). The result does not depend on the number of workers or on their timing: chunks are
assembled in file order. Held-out documents are whole files chosen by a hash of (seed, file name),
as for byte-level text (`infra.data.text`); a single file holds out its last `val_fraction`.

The LM task reads a token directory with `data.token_dir` (`open_token_dir`: `np.memmap`, nothing
loaded up front); windows are cut and shuffled by the same grain pipeline as in-memory text.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infra import paths
from infra.data import text
from infra.data.tokenizer import load_tokenizer
from infra.errors import DataError, output_error

INDEX = "index.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _tokenizer_id(tok) -> str:
    """What identifies a loaded tokenizer's behaviour: a hash of its tokenizer.json (or "bytes")."""
    if not getattr(tok, "spec", ""):
        return "bytes"
    return hashlib.sha256(Path(tok.file).read_bytes()).hexdigest()[:16]


def _documents(files: Sequence[str], val_fraction: float, seed: int) -> list[tuple[str, str, int, int]]:
    """(split, file, start byte, end byte or -1) per document, in file order."""
    if len(files) == 1:
        size = paths.size(files[0])
        cut = size - int(size * val_fraction)
        docs = [("train", files[0], 0, cut)]
        return docs + ([("val", files[0], cut, -1)] if cut < size else [])
    val = text.held_out_files(files, val_fraction, seed)
    return [("val" if f in val else "train", f, 0, -1) for f in files]


def _encode_chunk(args) -> tuple[int, dict[str, int]]:
    """Worker: tokenise one chunk of documents into parts/<chunk>.<split>.bin (+ a .json marker)."""
    chunk, docs, spec, parts, dtype = args

    tok = load_tokenizer(spec)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    texts: dict[str, list] = {s: [] for s in SPLITS}
    for split, path, start, end in docs:
        data = text.read_file(path, "--files")[start:(None if end < 0 else end)]
        if data:
            texts[split].append(data)
    for split in SPLITS:
        if not texts[split]:
            continue
        if not tok.spec:  # bytes: no decoding round trip
            arrays = [np.concatenate([[tok.bos_id], np.frombuffer(d, np.uint8), [tok.eos_id]])
                      for d in texts[split]]
        else:
            strs = [d.decode("utf-8", errors="replace") for d in texts[split]]
            arrays = [tok.encode_document_ids(ids) for ids in tok.encode_batch(strs)]
        out[split] = arrays
    counts = {}
    for split in SPLITS:
        joined = (np.concatenate(out[split]) if out[split] else np.zeros(0)).astype(dtype)
        tmp = parts / f"{chunk:06d}.{split}.bin.tmp"
        with open(tmp, "wb") as f:  # not ndarray.tofile: its short-write error has no errno
            f.write(joined.data)
        os.replace(tmp, parts / f"{chunk:06d}.{split}.bin")
        counts[split] = int(joined.size)
        counts[f"{split}_documents"] = len(out[split])
    tmp = parts / f"{chunk:06d}.json.tmp"
    tmp.write_text(json.dumps(counts))
    os.replace(tmp, parts / f"{chunk:06d}.json")
    return chunk, counts


def build_token_dir(files: Sequence[str], tokenizer: str, out: str | Path, *, val_fraction: float = 0.05,
                    seed: int = 0, workers: int = 0, chunk_bytes: int = 4 * 2**20,
                    progress: bool = True) -> dict:
    """Tokenise `files` with `tokenizer` (a `data.tokenizer` spec) into `out` (see module doc).
    `workers` 0 = one per CPU. Returns the index (also written as `out/index.json`); a finished
    directory with the same plan is returned as it is.

    Bad input (unreadable files, a tokenizer that does not load, an `out` that is a file or holds
    another tokenization) is refused before anything is written. An output that cannot be written
    is one error (`errors.output_error`); its half-written files are removed, finished chunks are
    kept for the next run to resume from (or the whole directory, if this run created it and
    finished none)."""
    out = Path(out)
    files = sorted(files)
    text.check_files(files, "--files")
    tok = load_tokenizer(tokenizer, "--tokenizer")
    dtype = token_dtype(tok.vocab_size)
    plan = {"version": 1, "tokenizer": _tokenizer_id(tok), "val_fraction": val_fraction,
            "seed": seed, "dtype": dtype.name,
            "files": [[f, paths.size(f)] for f in files]}
    plan_hash = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    finished = _finished_index(out, plan_hash)
    if finished is not None:
        return finished
    created = not out.exists()
    try:
        return _build(files, tokenizer, tok, out, plan, plan_hash, workers, chunk_bytes, progress)
    except BaseException as e:
        kept = _abandon(out, created)
        if isinstance(e, OSError):
            note = (f" ({kept} finished chunk{'s' if kept != 1 else ''} kept in {out / 'parts'}: "
                    "run the same command to resume)") if kept else ""
            raise output_error(out, e, "--out", note) from None
        raise


def _finished_index(out: Path, plan_hash: str) -> dict | None:
    """The index of a finished `out` made with this plan; None where there is none yet;
    DataError where `out` cannot be a token directory (a file, a directory of other files: none
    of them is overwritten) or holds another tokenization."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file; tokenize writes a directory: pass a new --out")
    if not (out / INDEX).exists():
        if out.is_dir() and not (out / "parts").is_dir() and any(out.iterdir()):
            raise DataError(f"--out '{out}' holds files that tokenize did not write; pass a new "
                            "or empty directory as --out")
        return None
    index = _read_json(out / INDEX)
    if not isinstance(index, dict):
        raise DataError(f"{out / INDEX} is not an index `tokenize` wrote; pass a new --out or "
                        "delete it")
    if index.get("plan") == plan_hash:
        return index
    raise DataError(f"{out} holds another tokenization (other files, tokenizer or split); "
                    "pass a new --out")


def _read_json(path: Path):
    """The JSON in `path`, or None where it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value) -> None:
    """Write `path` whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _abandon(out: Path, created: bool) -> int:
    """After a failed or interrupted build: remove half-written files, and `out` itself if this
    run created it and finished no chunk. Returns the number of finished chunks kept."""
    parts = out / "parts"
    for tmp in [*out.glob("*.tmp"), *parts.glob("*.tmp")]:
        with contextlib.suppress(OSError):  # must not mask why the build stopped
            tmp.unlink(missing_ok=True)
    kept = len([p for p in parts.glob("*.json") if p.name != "plan.json"])
    if created and not kept:
        shutil.rmtree(out, ignore_errors=True)
    return kept


def _chunk_counts(parts: Path, chunk: int, dtype: np.dtype) -> dict | None:
    """The counts of a finished chunk; None where its marker or files are missing or do not
    match (such a chunk is tokenised again, never trusted)."""
    counts = _read_json(parts / f"{chunk:06d}.json")
    if not isinstance(counts, dict):
        return None
    for split in SPLITS:
        n, path = counts.get(split), parts / f"{chunk:06d}.{split}.bin"
        size = path.stat().st_size if path.is_file() else -1
        if not isinstance(n, int) or size != n * dtype.itemsize:
            return None
    return counts


def _build(files: list[str], tokenizer: str, tok, out: Path, plan: dict, plan_hash: str,
           workers: int, chunk_bytes: int, progress: bool) -> dict:
    dtype = np.dtype(plan["dtype"])
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    plan_file = parts / "plan.json"
    if plan_file.exists():
        previous = _read_json(plan_file)
        if not isinstance(previous, dict) or previous.get("plan") != plan_hash:
            raise DataError(f"{out} holds an unfinished tokenization of other files or another "
                            "tokenizer; pass a new --out or delete it")
    _write_json(plan_file, {"plan": plan_hash, **plan})

    chunks = _chunks(_documents(files, plan["val_fraction"], plan["seed"]), chunk_bytes)
    todo = [i for i in range(len(chunks)) if _chunk_counts(parts, i, dtype) is None]
    start = time.perf_counter()
    _encode_all([(i, chunks[i], tokenizer, parts, dtype) for i in todo], workers,
                len(chunks) if progress else 0)
    index = {"version": 1, "plan": plan_hash, "dtype": dtype.name, "tokenizer": tokenizer,
             "tokenizer_id": plan["tokenizer"],
             "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
             "files": len(files), "splits": {}}
    counts = [_chunk_counts(parts, i, dtype) for i in range(len(chunks))]
    for split in SPLITS:  # assemble in chunk order: independent of the workers' timing
        tmp = out / f"{split}.bin.tmp"
        with open(tmp, "wb") as dst:
            for i in range(len(chunks)):
                with open(parts / f"{i:06d}.{split}.bin", "rb") as src:
                    shutil.copyfileobj(src, dst, 16 * 2**20)
        os.replace(tmp, out / f"{split}.bin")
        index["splits"][split] = {"file": f"{split}.bin", "tokens": sum(c[split] for c in counts),
                                  "documents": sum(c[f"{split}_documents"] for c in counts)}
    index["seconds"] = round(time.perf_counter() - start, 3)
    _write_json(out / INDEX, index)
    shutil.rmtree(parts)
    return index


def _chunks(docs: list[tuple[str, str, int, int]], chunk_bytes: int) -> list[list]:
    """`docs` cut into consecutive chunks of about `chunk_bytes` of text each."""
    chunks: list[list] = [[]]
    size = 0
    for d in docs:
        if chunks[-1] and size >= chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(d)
        size += paths.size(d[1]) if d[3] < 0 else d[3] - d[2]
    return chunks


def _encode_all(jobs: list[tuple], workers: int, progress_total: int) -> None:
    """Run `_encode_chunk` on every job, on `workers` processes (0 = one per CPU); a progress
    bar over `progress_total` chunks unless it is 0 (closed however this ends, so that an error
    is the last line)."""
    workers = workers or os.cpu_count() or 1
    from tqdm import tqdm

    with tqdm(total=progress_total, initial=progress_total - len(jobs), unit="chunk",
              desc="tokenizing", dynamic_ncols=True, disable=not progress_total) as bar:
        if workers > 1 and len(jobs) > 1:
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for _ in pool.imap_unordered(_encode_chunk, jobs):
                    bar.update(1)
        else:
            for job in jobs:
                _encode_chunk(job)
                bar.update(1)


def check_tokenizer(index: dict, tokenizer: str, directory: str | Path) -> None:
    """DataError unless `tokenizer` (a `data.tokenizer` spec) is the one the files were made with."""
    if index.get("tokenizer_id") != _tokenizer_id(load_tokenizer(tokenizer)):
        raise DataError(f"data.token_dir {str(directory)!r} was tokenised with "
                        f"{index.get('tokenizer') or 'bytes'!r}, not data.tokenizer "
                        f"{tokenizer or 'bytes'!r}", key="data.tokenizer",
                        value=repr(index.get("tokenizer") or ""))


def open_token_dir(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(index, {"train": memmap, "val": memmap}) of a directory `build_token_dir` wrote (one in
    a bucket is copied to the local cache first: memory maps need a local file)."""
    directory = paths.localize(directory) if paths.is_remote(directory) else Path(directory)
    try:
        index = json.loads((directory / INDEX).read_text())
    except (OSError, ValueError):
        raise DataError(f"data.token_dir {str(directory)!r} has no readable {INDEX}; write it "
                        "with python -m infra tokenize --out <dir>", key="data.token_dir",
                        value="<dir written by `infra tokenize`>") from None
    arrays = {}
    for split, info in index["splits"].items():
        path = directory / info["file"]
        expected = info["tokens"] * np.dtype(index["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise DataError(f"{path} is missing or truncated ({expected} bytes expected); "
                            "tokenize again into a new directory")
        arrays[split] = (np.memmap(path, dtype=index["dtype"], mode="r") if info["tokens"]
                         else np.zeros(0, index["dtype"]))
    return index, arrays


def tokenize_in_memory(files: Sequence[str], tok, *, val_fraction: float, seed: int,
                       pattern: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays of `files` packed as [BOS] ids [EOS] with a Hugging Face
    tokenizer `tok`, split as `build_token_dir` splits them (for corpora small enough to
    tokenise at every start; larger ones: `python -m infra tokenize` once, then data.token_dir)."""
    dtype = token_dtype(tok.vocab_size)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    docs = _documents(files, val_fraction, seed)
    texts = {s: [text.read_file(f)[a:(None if b < 0 else b)] for s2, f, a, b in docs if s2 == s]
             for s in SPLITS}
    for split in SPLITS:
        strs = [t.decode("utf-8", errors="replace") for t in texts[split] if t]
        for ids in tok.encode_batch(strs) if strs else []:
            out[split].append(tok.encode_document_ids(ids))
    if not out["train"] and not out["val"]:
        name = pattern if pattern is not None else ",".join(files[:3])
        raise DataError(f"data files {name!r} hold no text; point data.files at non-empty "
                        "text files (or leave it empty for the default corpus)")
    return tuple((np.concatenate(out[s]) if out[s] else np.zeros(0)).astype(dtype)
                 for s in SPLITS)
