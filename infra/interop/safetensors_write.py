"""Writing safetensors like `save_pretrained`: one `model.safetensors`, or
`model-0000i-of-0000n.safetensors` shards below a size limit plus `model.safetensors.index.json`.
Headers are computed first from shapes and dtypes, then tensors are produced and written one at
a time, so export holds one tensor at a time on the host. (Reading: `safetensors_io`.)
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from infra.errors import UserError
from infra.interop.safetensors_io import DTYPES, INDEX, SINGLE


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
                    f.write(memoryview(array.reshape(-1).view(np.uint8)))
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
            except (ValueError, OverflowError):  # OverflowError: "infGB"
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
