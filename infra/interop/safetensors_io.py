"""Safetensors checkpoints read: tensor slices straight onto device shardings.

Reading. `SafetensorsDir` opens a model directory (`model.safetensors`, or shards listed by
`model.safetensors.index.json`) and checks every file's header before anything is loaded: a
missing file, a truncated one (data shorter than its header says) or a tensor whose byte size
does not match its shape is refused in one line. `load_params` builds each parameter with
`jax.make_array_from_callback`: JAX asks for the slice each addressable device holds, and only
that slice is read. So a process of a multi-process run reads only its devices' slices, and
identical slices (replicated dims) are read once.

Host memory. The format is simple (8-byte header length, JSON header, raw little-endian data),
so slices are read with positioned reads (`os.preadv`) straight into the destination array
instead of through a memory map: the pages of a mapping count in the resident set for as long
as it is mapped (the `safetensors` package maps whole files), a read buffer only for as long as
the slice lives. A slice that is whole in every dim but the first is one read; any other slice
is read in row blocks of at most `READ_BLOCK` bytes, each cut down to the slice. Each
parameter is finished (`block_until_ready`) before the next starts and the dtype cast is skipped
when the dtypes agree, so the transient host memory of a load stays about one tensor (measured:
tests/test_interop_memory.py, scripts/bench_interop.py), not the model.

Writing: `infra.interop.safetensors_write`.
"""

from __future__ import annotations

import functools
import itertools
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

from infra import paths
from infra.errors import UserError
from infra.interop.hf_weights import IGNORED_SUFFIXES, TIED_COPY, TensorMap

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class CheckpointFileError(UserError):
    """A safetensors checkpoint that is missing, truncated or inconsistent."""


def read_header(path: Path, with_offset: bool = False):
    """The tensor entries of one safetensors file's header, checked against the file's size
    (with `with_offset`: and the absolute offset where the data begins)."""
    if paths.special_file(path):
        raise CheckpointFileError(f"{path} is not a regular file (a FIFO or device); the "
                                  "checkpoint directory must hold the downloaded files")
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
        raise CheckpointFileError(f"{path} is missing; the checkpoint directory is "
                                  "incomplete") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"cannot read the header of {path} ({type(e).__name__}); is "
                                  "it a safetensors file?") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{path} has no safetensors header")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, entry in header.items():
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            entry["shape"] = [int(x) for x in entry["shape"]]
            entry["dtype"] = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFileError(f"{path}: the header entry of {name!r} is malformed; is "
                                      "it a safetensors file?") from None
        entry["data_offsets"] = [start, end]
        if entry["dtype"] not in DTYPES:
            raise CheckpointFileError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, "
                                      f"which is not supported ({', '.join(DTYPES)})")
        if start < 0 or end < start or min(entry["shape"], default=0) < 0:
            raise CheckpointFileError(f"{path}: tensor {name!r} has byte range [{start}, {end}) "
                                      f"and shape {entry['shape']}, which no safetensors file "
                                      "holds; the file is corrupt: download or copy it again")
        if end > data:
            raise CheckpointFileError(f"{path} is truncated: tensor {name!r} ends at byte {end} "
                                      f"of the data but the file holds {data}; download or copy "
                                      "it again")
        if end - start != math.prod(entry["shape"]) * np.dtype(DTYPES[entry["dtype"]]).itemsize:
            raise CheckpointFileError(f"{path}: tensor {name!r} has {end - start} bytes, not "
                                      f"what its shape {entry['shape']} needs")
    _check_contiguous(path, header, data)
    return (header, 8 + n) if with_offset else header


def _check_contiguous(path: Path, header: dict, data: int) -> None:
    """The format's layout: the tensors' byte ranges tile the data exactly, in some order, with
    no overlap (two tensors sharing bytes) and no hole; the data ends where the last one does."""
    at, previous = 0, None
    for name, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start, end = entry["data_offsets"]
        if start < at:
            raise CheckpointFileError(f"{path}: tensors {previous!r} and {name!r} share bytes "
                                      f"(byte {start} < {at}); the file is corrupt: download or "
                                      "copy it again")
        if start > at:
            raise CheckpointFileError(f"{path}: bytes {at}-{start} of the data belong to no "
                                      f"tensor (before {name!r}); the file is corrupt: download "
                                      "or copy it again")
        at, previous = end, name
    if at != data:
        raise CheckpointFileError(f"{path} holds {data - at} bytes after its last tensor; the "
                                  "file is corrupt: download or copy it again")


def read_index(index: Path) -> dict[str, str]:
    """The `weight_map` of `model.safetensors.index.json`: tensor name -> shard file, each shard
    a plain file name inside the model directory (not `../x`, not an absolute path)."""
    if paths.special_file(index):
        raise CheckpointFileError(f"{index} is not a regular file (a FIFO or device)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointFileError(f"cannot read {index} ({type(e).__name__}: no JSON object "
                                  "with a weight_map); download it again") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFileError(f"{index}: weight_map is not an object of tensor names to "
                                  "shard files; download it again")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file:
            raise CheckpointFileError(f"{index}: tensor {name!r} maps to {file!r}, not a shard "
                                      "file name; download it again")
        if Path(file).is_absolute() or ".." in Path(file).parts or "\\" in file:
            raise CheckpointFileError(f"{index}: tensor {name!r} is in {file!r}, outside the "
                                      "model directory; shards must be files inside it")
    return weight_map


class SafetensorsDir:
    """The tensors of a Hugging Face model directory: name -> (file, dtype, shape)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.exists():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).exists():
            weight_map, files = None, [SINGLE]
        else:
            raise CheckpointFileError(f"no {SINGLE} or {INDEX} in {self.directory}; pass a "
                                      "Hugging Face model directory saved with safetensors")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
        self.offsets: dict[str, int] = {}  # absolute byte offset of each tensor's data
        self.bytes_read = 0  # tensor bytes this process has read (its devices' slices)
        for file in files:
            path = self.directory / file
            header, data_start = read_header(path, with_offset=True)
            for name, entry in header.items():
                if weight_map is not None and weight_map.get(name) != file:
                    continue
                self.entries[name] = (path, entry["dtype"], tuple(entry["shape"]))
                self.offsets[name] = data_start + entry["data_offsets"][0]
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

        extra = sorted(n for n in set(self.entries) - needed
                       if not n.endswith(IGNORED_SUFFIXES) and not (tied and n == TIED_COPY))
        if extra:
            raise CheckpointFileError(f"the checkpoint in {self.directory} holds tensor "
                                      f"{extra[0]!r}, which this architecture does not use; "
                                      "refusing to drop weights")

    def will_need(self, names: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors' bytes (page cache, not our memory)."""
        for name in names:
            path, dtype, shape = self.entries[name]
            size = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, self.offsets[name], size, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        """`tensor[slices]` (step-1 slices, one per dim)."""
        return self.read_many(name, [slices])[0]

    def read_many(self, name: str, requests: list[tuple[slice, ...]]) -> list[np.ndarray]:
        """`tensor[r]` for every request `r` (step-1 slices, one per dim), with positioned reads:
        a request whole in every dim but the first is one read into its result; the others are
        cut from row blocks of at most `READ_BLOCK` bytes read once for all of them (so 8
        devices holding 8 column slices of a tensor read it once, not 8 times)."""
        path, dtype, shape = self.entries[name]
        dtype, scalar = np.dtype(DTYPES[dtype]), not shape
        if scalar:
            shape, requests = (1,), [(slice(0, 1),)] * len(requests)
        bounds = [[s.indices(n)[:2] for s, n in zip(r, shape)] for r in requests]
        outs = [np.empty([b - a for a, b in bs], dtype) for bs in bounds]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        strided = [i for i, bs in enumerate(bounds)
                   if any(b - a != n for (a, b), n in zip(bs[1:], shape[1:]))]
        fd = os.open(path, os.O_RDONLY)
        try:
            for i, bs in enumerate(bounds):
                if i not in strided:
                    _pread_into(fd, outs[i], self.offsets[name] + bs[0][0] * row_bytes)
                    self.bytes_read += outs[i].nbytes
            if strided:  # mapped one row block at a time: only the pages holding the slices
                first = min(bounds[i][0][0] for i in strided)  # are read, and each block's
                last = max(bounds[i][0][1] for i in strided)  # mapping is dropped at once
                block = max(1, READ_BLOCK // max(row_bytes, 1))
                for r in range(first, last, block):
                    n = min(block, last - r)
                    rows = np.memmap(path, dtype, "r", offset=self.offsets[name] + r * row_bytes,
                                     shape=(n, *shape[1:]))
                    for i in strided:
                        (a, b), trailing = bounds[i][0], tuple(slice(x, y) for x, y in bounds[i][1:])
                        lo, hi = max(a, r), min(b, r + n)
                        if lo < hi:
                            outs[i][lo - a: hi - a] = rows[(slice(lo - r, hi - r), *trailing)]
                            self.bytes_read += outs[i][lo - a: hi - a].nbytes
                    del rows  # the last reference: unmapped here
        finally:
            os.close(fd)
        return [o.reshape(()) for o in outs] if scalar else outs


READ_BLOCK = 16 * 2**20  # bytes of rows read at once for slices that cut the inner dims


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill `out` (C-contiguous) with the file's bytes from `offset`."""
    view = memoryview(out.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointFileError(f"unexpected end of file reading {out.nbytes} bytes at "
                                      f"offset {offset}; the file is truncated")
        done += n


def _normalize(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _key(index: tuple, shape: tuple[int, ...]) -> tuple:
    return tuple((s.start, s.stop) for s in _normalize(index, shape))


def read_unit(ckpt: SafetensorsDir, m: TensorMap, layer: int | None, shape: tuple[int, ...],
              keys: list[tuple], dtype) -> dict[tuple, np.ndarray]:
    """The slices `keys` (from `_key`) of our parameter `m` (of layer `layer` only, when not
    None) in `dtype`, reading only those parts of the file."""
    stack = m.stack if layer is None else m.stack[1:]  # the unit's own stacked dims
    names = m.names if layer is None else m.names_of((layer,))
    by_name: dict[int, list] = {}
    counts: dict[tuple, tuple[int, ...]] = {}
    for key in keys:
        index = tuple(slice(a, b) for a, b in key)
        ranges = [range(n)[s] for n, s in zip(stack, index)]
        counts[key] = tuple(len(r) for r in ranges)
        read, after = m.hf_slices(index[len(stack):])
        for at in itertools.product(*ranges):
            flat = int(np.ravel_multi_index(at, stack)) if stack else 0
            by_name.setdefault(flat, []).append((key, read, after))
    parts: dict[tuple, list[np.ndarray]] = {key: [] for key in keys}
    for i, items in sorted(by_name.items()):
        raws = ckpt.read_many(names[i], [read for _, read, _ in items])
        for (key, read, after), raw in zip(items, raws):
            part = raw.reshape(m.read_shape(read))[after].transpose(m.perm)
            parts[key].append(part.astype(dtype, copy=False))
    return {key: np.stack(p).reshape(counts[key] + p[0].shape) if stack else p[0]
            for key, p in parts.items()}


def read_slice(ckpt: SafetensorsDir, m: TensorMap, index: tuple, dtype) -> np.ndarray:
    """Our parameter `m` restricted to `index`, in `dtype`, reading only that part of the file."""
    key = _key(index, m.shape)
    return read_unit(ckpt, m, None, m.shape, [key], dtype)[key]


def _units(leaf, m: TensorMap) -> list[tuple[int | None, tuple[int, ...], Any]]:
    """(layer, shape, sharding) of the arrays a parameter is built from: one, or one per layer of
    a stacked parameter whose layers dim is not sharded (placed into it one layer at a time)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = leaf.sharding
    spec = tuple(getattr(sharding, "spec", ()))
    if m.stacked and isinstance(sharding, NamedSharding) and (not spec or spec[0] is None):
        sub = NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))
        return [(i, tuple(leaf.shape[1:]), sub) for i in range(m.stack[0])]
    return [(None, tuple(leaf.shape), sharding)]


def load_params(ckpt: SafetensorsDir, maps: list[TensorMap], abstract_params: Any,
                on_tensor: Callable[[str, jax.Array], None] | None = None) -> Any:
    """Our parameter tree (`abstract_params`: ShapeDtypeStructs with shardings) filled from the
    checkpoint, one tensor at a time, each device's slice read straight from the file; the next
    tensor's slices are read in a background thread while the current one is placed (positioned
    reads release the GIL), so reading overlaps the host-to-device copies. A stacked
    (scan_layers) parameter is placed one layer at a time into a buffer updated in place.
    `on_tensor(path, array)` is called after each parameter is on its devices (memory probes)."""
    from concurrent.futures import ThreadPoolExecutor

    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(abstract_params)
    if len(leaves) != len(maps):
        raise ValueError("tensor maps do not match the parameter tree")
    work = [(j, layer, shape, sharding) for j, (leaf, m) in enumerate(zip(leaves, maps))
            for layer, shape, sharding in _units(leaf, m)]

    def read(k: int) -> dict:
        j, layer, shape, sharding = work[k]
        if k + 1 < len(work):  # the disk reads ahead while we read and place this one
            nj, nlayer = work[k + 1][:2]
            ckpt.will_need(maps[nj].names if nlayer is None else maps[nj].names_of((nlayer,)))
        keys = sorted({_key(i, shape) for i in
                       sharding.addressable_devices_indices_map(shape).values()})
        return read_unit(ckpt, maps[j], layer, shape, keys, leaves[j].dtype)

    out: list[Any] = [None] * len(leaves)
    with ThreadPoolExecutor(1, thread_name_prefix="infra-safetensors") as pool:
        pending = pool.submit(read, 0) if work else None
        for k, (j, layer, shape, sharding) in enumerate(work):
            slices = pending.result()
            pending = pool.submit(read, k + 1) if k + 1 < len(work) else None
            array = jax.make_array_from_callback(
                shape, sharding, lambda index, s=slices, shape=shape: s[_key(index, shape)])
            del slices
            leaf = leaves[j]
            if layer is None:
                out[j] = array.block_until_ready()
            else:
                if layer == 0:
                    out[j] = jax.jit(lambda: jnp.zeros(leaf.shape, leaf.dtype),
                                     out_shardings=leaf.sharding)()
                out[j] = _set_layer(out[j], array, layer).block_until_ready()
            del array
            if on_tensor is not None and (layer is None or layer == maps[j].stack[0] - 1):
                on_tensor(maps[j].path, out[j])
    return jax.tree.unflatten(treedef, out)


def check_finite(ckpt: SafetensorsDir, maps: list[TensorMap], params: Any) -> None:
    """CheckpointFileError naming the checkpoint's tensors that hold NaN or Inf: a run started
    from them fails many steps later as a "non-finite loss", far from the cause. Checked on the
    devices (one reduction per parameter, per layer when stacked), without a host copy."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    leaves = jax.tree.leaves(params)
    if not leaves:
        return

    def finite(xs):
        return [jnp.isfinite(x).reshape(len(m.names), -1).all(axis=1) if m.stacked
                else jnp.isfinite(x).all() for x, m in zip(xs, maps)]

    replicated = NamedSharding(leaves[0].sharding.mesh, PartitionSpec())
    flags = jax.device_get(jax.jit(finite, out_shardings=replicated)(leaves))
    bad = [name for m, ok in zip(maps, flags)
           for name, fine in zip(m.names, np.atleast_1d(ok)) if not fine]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointFileError(f"tensor {bad[0]!r}{more} in {ckpt.directory} holds NaN or Inf "
                                  "values; the checkpoint is corrupt or was saved after training "
                                  "diverged: download it again or use another checkpoint")


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, layer_array: jax.Array, index) -> jax.Array:
    """`stacked[index] = layer_array`, in place (the stacked buffer is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer_array.astype(stacked.dtype),
                                               index, 0)


# --------------------------------------------------------------------------- writing
