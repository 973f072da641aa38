"""Safetensors checkpoints: read tensor slices straight onto device shardings; write shards.

Reading. `SafetensorsDir` opens a model directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`) and checks every file's header before anything is loaded: a
missing file, a truncated one (data shorter than its header says) or a tensor whose byte size
does not match its shape is refused in one line. `load_params` builds each parameter with
`jax.make_array_from_callback`: JAX asks for the slice each addressable device holds, and only
that slice is read (`safe_open(...).get_slice`, memory-mapped). So a process of a multi-process
run reads only its devices' slices, and identical slices (replicated dims) are read once.

Host memory. Each tensor is read through its own short-lived `safe_open`: the file mapping, whose
touched pages count in the resident set, is dropped after every tensor, and each parameter is
finished (`block_until_ready`) before the next starts. The transient memory of a load is
therefore about one tensor's mapped pages plus its converted slices (at most ~2x the largest
tensor), not the model (tests/test_interop_memory.py measures it).

Writing. `write_safetensors` writes like `save_pretrained`: one `model.safetensors`, or
`model-0000i-of-0000n.safetensors` shards below a size limit plus `model.safetensors.index.json`.
Headers are computed first from shapes and dtypes, then tensors are produced and written one at
a time, so export also holds one tensor at a time on the host.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

from infra.errors import UserError
from infra.interop.hf_weights import TensorMap

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class CheckpointFileError(UserError):
    """A safetensors checkpoint that is missing, truncated or inconsistent."""


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of one safetensors file's header, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointFileError(f"{path} is truncated ({size} bytes, no header); "
                                          "download or copy it again")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointFileError(f"{path} is truncated or not a safetensors file "
                                          f"(header of {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointFileError(f"{path} is missing; the checkpoint directory is incomplete")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"cannot read the header of {path} ({type(e).__name__}); is "
                                  "it a safetensors file?") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path} has no safetensors header")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        if entry["dtype"] not in DTYPES:
            raise CheckpointFileError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, "
                                      f"which is not supported ({', '.join(DTYPES)})")
        if end > data:
            raise CheckpointFileError(f"{path} is truncated: tensor {name!r} ends at byte {end} "
                                      f"of the data but the file holds {data}; download or copy "
                                      "it again")
        if end - start != math.prod(entry["shape"]) * np.dtype(DTYPES[entry["dtype"]]).itemsize:
            raise CheckpointFileError(f"{path}: tensor {name!r} has {end - start} bytes, not "
                                      f"what its shape {entry['shape']} needs")
    return header


class SafetensorsDir:
    """The tensors of a Hugging Face model directory: name -> (file, dtype, shape)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointFileError(f"cannot read {index} ({type(e).__name__})") from None
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise CheckpointFileError(f"no {SINGLE} or {INDEX} in {self.directory}; pass a "
                                      "Hugging Face model directory saved with safetensors")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        for file in files:
            path = self.directory / file
            for name, entry in read_header(path).items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue
                self.entries[name] = (path, entry["dtype"], tuple(entry["shape"]))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.entries))
            if missing:
                raise CheckpointFileError(f"{index} lists tensor {missing[0]!r} in "
                                          f"{weight_map[missing[0]]}, which does not hold it")

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * np.dtype(DTYPES[d]).itemsize for _, d, s in self.entries.values())

    def check(self, maps: Iterable[TensorMap], *, tied: bool) -> None:
        """Every tensor the model needs is here with its shape, and nothing else is."""
        needed = set()
        for m in maps:
            for name in m.names:
                needed.add(name)
                if name not in self.entries:
                    raise CheckpointFileError(f"tensor {name!r} is missing from the checkpoint in "
                                              f"{self.directory}; it does not match its config.json")
                shape = self.entries[name][2]
                if shape != m.hf_shape:
                    raise CheckpointFileError(
                        f"tensor {name!r} in {self.entries[name][0]} has shape {list(shape)} but "
                        f"config.json implies {list(m.hf_shape)}; the weights do not match the "
                        "config")
        from infra.interop.hf_weights import IGNORED_SUFFIXES, TIED_COPY

        extra = sorted(n for n in set(self.entries) - needed
                       if not n.endswith(IGNORED_SUFFIXES) and not (tied and n == TIED_COPY))
        if extra:
            raise CheckpointFileError(f"the checkpoint in {self.directory} holds tensor "
                                      f"{extra[0]!r}, which this architecture does not use; "
                                      "refusing to drop weights")

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        """`tensor[slices]` (a copy), read through a mapping that is closed again at once."""
        from safetensors import safe_open

        path = self.entries[name][0]
        with safe_open(str(path), framework="np") as f:
            return np.ascontiguousarray(f.get_slice(name)[slices])


def _normalize(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def read_slice(ckpt: SafetensorsDir, m: TensorMap, index: tuple, dtype) -> np.ndarray:
    """Our parameter `m` restricted to `index`, in `dtype`, reading only that part of the file."""
    index = _normalize(index, m.shape)
    layers = range(len(m.names))[index[0]] if m.stacked else [0]
    inner = index[1:] if m.stacked else index
    read, after = m.hf_slices(inner)
    parts = []
    for layer in layers:
        raw = ckpt.read(m.names[layer], read)
        part = raw.reshape(m.read_shape(read))[after].transpose(m.perm)
        parts.append(part.astype(dtype))
    return np.stack(parts) if m.stacked else parts[0]


def load_params(ckpt: SafetensorsDir, maps: list[TensorMap], abstract_params: Any,
                on_tensor: Callable[[str], None] | None = None) -> Any:
    """Our parameter tree (`abstract_params`: ShapeDtypeStructs with shardings) filled from the
    checkpoint, one parameter at a time, each device's slice read straight from the file.
    `on_tensor(path)` is called after each parameter is on its devices (memory probes)."""
    leaves, treedef = jax.tree.flatten(abstract_params)
    if len(leaves) != len(maps):
        raise ValueError("tensor maps do not match the parameter tree")
    out = []
    for leaf, m in zip(leaves, maps):
        cache: dict[tuple, np.ndarray] = {}

        def fetch(index, m=m, dtype=leaf.dtype, cache=cache):
            key = tuple((s.start, s.stop) for s in _normalize(index, m.shape))
            if key not in cache:
                cache[key] = read_slice(ckpt, m, index, dtype)
            return cache[key]

        array = jax.make_array_from_callback(tuple(leaf.shape), leaf.sharding, fetch)
        out.append(array.block_until_ready())
        del cache
        if on_tensor is not None:
            on_tensor(m.path)
    return jax.tree.unflatten(treedef, out)


# --------------------------------------------------------------------------- writing


def _header_bytes(entries: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, sizes = 0, []
    for name, dtype, shape in entries:
        size = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        sizes.append(size)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def plan_shards(entries: list[tuple[str, str, tuple[int, ...]]],
                max_shard_bytes: int) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own), as `save_pretrained` does."""
    shards: list[list] = [[]]
    used = 0
    for entry in entries:
        size = math.prod(entry[2]) * np.dtype(DTYPES[entry[1]]).itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def write_safetensors(out_dir: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                      produce: Callable[[str], np.ndarray], *, max_shard_bytes: int,
                      write: bool = True) -> list[str]:
    """Write `entries` (name, safetensors dtype, shape) into `out_dir`, each tensor's data from
    `produce(name)` (called once per tensor, in order, on every process; only `write` processes
    write). Returns the file names."""
    shards = plan_shards(entries, max_shard_bytes)
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = 0
    for file, shard in zip(files, shards):
        header, sizes = _header_bytes(shard)
        f = open(out_dir / file, "wb") if write else None
        try:
            if f:
                f.write(header)
            for (name, dtype, shape), size in zip(shard, sizes):
                array = np.ascontiguousarray(produce(name), dtype=DTYPES[dtype])
                if array.shape != tuple(shape) or array.nbytes != size:
                    raise ValueError(f"{name}: produced {array.shape}, expected {shape}")
                if f:
                    f.write(memoryview(array.reshape(-1)).cast("B"))
                total += size
        finally:
            if f:
                f.close()
    if n > 1 and write:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
        (out_dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return files


def parse_size(text: str | int) -> int:
    """`"5GB"`, `"500MB"`, `"2GiB"` or bytes -> bytes (save_pretrained's units: GB = 10^9)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3,
             "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise UserError(f"--max_shard_size {text!r} is not a size; write e.g. 5GB or 500MB") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
