"""Is a checkpoint intact, and does it fit this model? Checksums and array specs.

Every save records a 32-bit checksum of each state array (`fingerprint`), computed on the
devices; every restore recomputes them, so truncated or altered files are detected instead of
loading wrong values. `saved_specs` reads the dtypes and shapes a checkpoint holds without
reading the arrays, so an incompatible model is refused before anything is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from infra import paths
from infra.checkpoint.layout import FINGERPRINT
from infra.paths import PathLike


class Corrupt(Exception):
    """A checkpoint proven damaged: truncated or undecodable files, or values whose checksums
    differ from those saved. Only this gets a checkpoint moved aside."""


class Unreadable(Exception):
    """A checkpoint that could not be read for a reason that says nothing about its files
    (permissions, too many open files, out of memory, a transient I/O error): the run stops and
    nothing is moved, so it restores once the cause is fixed."""


# What reading damaged files raises (tensorstore: ValueError; files: OSError; ...), possibly
# wrapped by Orbax in a plain Exception. Anything else is a bug, not corruption, and must not get
# a good checkpoint moved aside.
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, RuntimeError)
# Reasons a read fails that are not the files' fault: OS error numbers and tensorstore (absl)
# status codes, which tensorstore puts at the start of its error messages.
ENVIRONMENT_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                      errno.EMFILE: "too many open files", errno.ENFILE: "too many open files",
                      errno.ENOMEM: "out of memory", errno.EIO: "I/O error",
                      errno.EAGAIN: "resource temporarily unavailable", errno.EBUSY: "busy",
                      errno.ETIMEDOUT: "timed out", errno.ESTALE: "stale file handle"}
ENVIRONMENT_CODES = ("PERMISSION_DENIED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED",
                     "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED")


def causes(e: BaseException | None):
    """`e` and the exceptions it was raised from or during."""
    seen = set()
    while e is not None and id(e) not in seen:
        yield e
        seen.add(id(e))
        e = e.__cause__ or e.__context__


def is_read_error(e: BaseException | None) -> bool:
    """`e`, or an exception in its chain, is what reading damaged files raises."""
    return any(isinstance(x, READ_ERRORS) for x in causes(e))


def environment_problem(e: BaseException | None) -> str | None:
    """Why reading failed when the cause is the environment, not the files (None otherwise)."""
    for x in causes(e):
        if isinstance(x, MemoryError):
            return "out of memory"
        if isinstance(x, OSError) and x.errno in ENVIRONMENT_ERRNOS:
            return f"{ENVIRONMENT_ERRNOS[x.errno]} ({x.filename or x})"
        code = next((c for c in ENVIRONMENT_CODES if str(x).lstrip().startswith(c)), None)
        if code is not None:
            return str(x).strip().splitlines()[0][:200]
    return None


def diagnose(e: Exception, step_dir: Path) -> Exception | None:
    """What a failed read of the checkpoint in `step_dir` means: `Unreadable` (the environment:
    nothing is moved), `Corrupt` (the files are damaged), or None (not a read failure: a bug,
    to be raised as it is)."""
    problem = environment_problem(e)
    if problem is not None:
        return Unreadable(problem)
    corrupt = next((x for x in causes(e) if isinstance(x, Corrupt)), None)
    if corrupt is None and not is_read_error(e):
        return None
    try:
        check_readable(step_dir)  # a file that cannot even be opened is not damage
    except Unreadable as unreadable:
        return unreadable
    if corrupt is not None:
        return corrupt
    cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return Corrupt(f"unreadable files ({type(e).__name__}: {cause})")


def check_readable(step_dir: PathLike) -> None:
    """`Unreadable` when a file of the checkpoint cannot even be opened for an environmental
    reason (a damaged checkpoint's files open fine; its contents are wrong)."""
    for path in paths.tree(step_dir):
        try:
            if path.is_dir():
                list(path.iterdir())
            else:
                with path.open("rb"):
                    pass
        except OSError as e:
            if e.errno in ENVIRONMENT_ERRNOS:
                raise Unreadable(f"cannot open {path}: {ENVIRONMENT_ERRNOS[e.errno]}") from None


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
def _checksum(x: jax.Array) -> jax.Array:
    """A 32-bit checksum of an array: every element's bits, mixed with its position through a
    murmur3-style finaliser, summed (computed where the array lives). One small program per
    shape and dtype, not one over the whole tree: a model has few distinct shapes, so a
    restore traces and loads a few tiny programs instead of one as large as the model."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    h = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32).ravel()
    h = h ^ (jnp.arange(h.size, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)


def fingerprint_async(state: Any) -> tuple[list[str], list[jax.Array]]:
    """Leaf paths and their checksums, still being computed on the devices."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = []
    for _, leaf in flat:
        sums.append(_checksum(leaf))
        devices = leaf.sharding.device_set
        if len(devices) > 1 and next(iter(devices)).platform == "cpu":
            # one collective program at a time: XLA:CPU deadlocks (and aborts after 40 s)
            # when several small collective programs are in flight on emulated devices
            sums[-1].block_until_ready()
    return [path_name(path) for path, _ in flat], sums


def fingerprint(state: Any) -> dict[str, int]:
    """`{leaf path: checksum}` of every array in `state` (one small device-to-host copy)."""
    names, sums = fingerprint_async(state)
    return {name: int(s) for name, s in zip(names, jax.device_get(sums))}


def read_fingerprint(step_dir: PathLike) -> dict[str, int]:
    """The checksums a checkpoint was saved with (`Corrupt` when they cannot be read)."""
    try:
        return json.loads((paths.path(step_dir) / FINGERPRINT / "fingerprint.json").read_text())
    except (OSError, ValueError) as e:
        raise Corrupt(f"unreadable checksums ({type(e).__name__})") from None


def check_fingerprint(step_dir: Path, restored: Any, *, whole: bool = True) -> None:
    """`Corrupt` unless every restored array has the checksum it was saved with. `whole`: the
    restored tree must also hold every saved array; otherwise it may be a subtree (keyed as in
    the saved tree, e.g. `{"params": ...}`)."""
    expected = {k: v for k, v in read_fingerprint(step_dir).items() if not k.startswith("#")}
    got = fingerprint(restored)
    bad = sorted(k for k in got if expected.get(k) != got[k])
    if whole:
        bad = sorted(k for k in expected if got.get(k) != expected[k]) or sorted(
            got.keys() ^ expected.keys())
    if bad:
        raise Corrupt(f"values of '{bad[0]}' differ from those saved")


META_DIGEST = "#meta"


def meta_digest(meta: dict) -> str:
    """SHA-256 of the metadata's canonical JSON (what the checkpoint's `meta` item holds)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def check_meta(step_dir: Path, meta: dict) -> None:
    """`Corrupt` when the metadata read back is not what was saved (checkpoints written before
    metadata digests have none to check)."""
    recorded = read_fingerprint(step_dir).get(META_DIGEST)
    if recorded is not None and recorded != meta_digest(meta):
        raise Corrupt("its metadata differs from what was saved")


def specs(tree: Any) -> dict[str, str]:
    """`{leaf path: "float32[4, 8]"}` of arrays, abstract arrays or Orbax array metadata."""
    return {path_name(p): f"{a.dtype}{list(a.shape)}"
            for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_mismatch(saved: dict[str, str], here: dict[str, str]) -> tuple[str, str] | None:
    """Where a checkpoint's arrays (`saved`, from `saved_specs`) and a model's (`here`, from
    `specs`) first differ, in name order: (name, "missing") for an array only the model has,
    (name, "extra") for one only the checkpoint has, (name, "spec") for other shapes or dtypes;
    None when they agree."""
    for name in sorted(here.keys() | saved.keys()):
        if name not in saved:
            return name, "missing"
        if name not in here:
            return name, "extra"
        if saved[name] != here[name]:
            return name, "spec"
    return None


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
