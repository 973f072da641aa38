"""Is a checkpoint intact, and does it fit this model? Checksums and array specs.

Every save records a 32-bit checksum of each state array (`fingerprint`), computed on the
devices; every restore recomputes them, so truncated or altered files are detected instead of
loading wrong values. `saved_specs` reads the dtypes and shapes a checkpoint holds without
reading the arrays, so an incompatible model is refused before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from infra.checkpoint.layout import FINGERPRINT


class Corrupt(Exception):
    """A checkpoint whose files cannot be read back or whose values do not match."""


# What reading damaged files raises (tensorstore: ValueError; files: OSError; ...), possibly
# wrapped by Orbax in a plain Exception. Anything else is a bug, not corruption, and must not get
# a good checkpoint moved aside.
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, RuntimeError)


def is_read_error(e: BaseException | None) -> bool:
    """`e`, or an exception in its chain, is what reading damaged files raises."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, READ_ERRORS):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def path_name(path) -> str:
    """`params/blocks/0/attn/q` for any mix of dict, sequence and attribute keys."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)


@jax.jit
def _fingerprint_leaves(leaves: list[jax.Array]) -> list[jax.Array]:
    """A 32-bit checksum of each array: every element's bits, mixed with its position through a
    murmur3-style finaliser, summed (computed where the array lives)."""
    out = []
    for x in leaves:
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        h = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()
        h = h ^ (jnp.arange(h.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9))
        h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
        h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
        out.append(jnp.sum(h ^ (h >> 16), dtype=jnp.uint32))
    return out


def fingerprint_async(state: Any) -> tuple[list[str], list[jax.Array]]:
    """Leaf paths and their checksums, still being computed on the devices."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return [path_name(path) for path, _ in flat], _fingerprint_leaves([leaf for _, leaf in flat])


def fingerprint(state: Any) -> dict[str, int]:
    """`{leaf path: checksum}` of every array in `state` (one small device-to-host copy)."""
    names, sums = fingerprint_async(state)
    return {name: int(s) for name, s in zip(names, jax.device_get(sums))}


def read_fingerprint(step_dir: Path) -> dict[str, int]:
    """The checksums a checkpoint was saved with (`Corrupt` when they cannot be read)."""
    try:
        return json.loads((Path(step_dir) / FINGERPRINT / "fingerprint.json").read_text())
    except (OSError, ValueError) as e:
        raise Corrupt(f"unreadable checksums ({type(e).__name__})") from None


def check_fingerprint(step_dir: Path, restored: Any, *, whole: bool = True) -> None:
    """`Corrupt` unless every restored array has the checksum it was saved with. `whole`: the
    restored tree must also hold every saved array; otherwise it may be a subtree (keyed as in
    the saved tree, e.g. `{"params": ...}`)."""
    expected = read_fingerprint(step_dir)
    got = fingerprint(restored)
    bad = sorted(k for k in got if expected.get(k) != got[k])
    if whole:
        bad = sorted(k for k in expected if got.get(k) != expected[k]) or sorted(
            got.keys() ^ expected.keys())
    if bad:
        raise Corrupt(f"values of '{bad[0]}' differ from those saved")


def specs(tree: Any) -> dict[str, str]:
    """`{leaf path: "float32[4, 8]"}` of arrays, abstract arrays or Orbax array metadata."""
    return {path_name(p): f"{a.dtype}{list(a.shape)}"
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def saved_specs(state_dir: Path) -> dict[str, str]:
    """The dtypes and shapes a checkpoint's `state` item holds, read from Orbax's metadata
    (no arrays are read); `Corrupt` when it cannot be read or is empty."""
    try:
        saved = specs(ocp.StandardCheckpointer().metadata(state_dir).item_metadata)
    except READ_ERRORS as e:
        raise Corrupt(f"unreadable array metadata in {state_dir} ({type(e).__name__})") from None
    if not saved:  # damaged metadata can read back as an empty tree
        raise Corrupt(f"no array metadata in {state_dir}")
    return saved
