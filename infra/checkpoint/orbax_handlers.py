"""Our Orbax checkpoint handlers: the one file that depends on Orbax internals.

Orbax 0.12 exports neither the transfer-priority callback nor the array metadata store that
its default jax.Array handler uses; both are needed to move the device-to-host copy of an async
save into the background (`StateHandler`). pyproject pins orbax to 0.12.x; an Orbax upgrade
touches this file only.

* `StateHandler`: Orbax's standard PyTree handler (same files, same restore), with the arrays'
  transfers to the host in the background commit.
* `FingerprintHandler`: the checksums, fetched from the devices and written as JSON in Orbax's
  background save thread, so the training loop never waits for them.
* `set_storage_retries`: the bucket retry budget of Orbax's tensorstore contexts.
* `IteratorHandler`: grain's iterator checkpoint (`process_<i>-of-<n>.json`, restored by grain's
  own code), written in Orbax's background commit instead of grain's synchronous `save`.

Each handler needs a save and a restore args class: Orbax pairs args with handlers by type.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store as _array_metadata
from orbax.checkpoint._src.serialization import tensorstore_utils as _ts_utils
from orbax.checkpoint._src.serialization import types as _serialization

from infra.checkpoint.verify import Corrupt

# Host memory the background transfers may hold at once before their bytes are written.
_IN_FLIGHT_GB = 16


def set_storage_retries(max_retries: int) -> None:
    """How often tensorstore retries a failed bucket request (exponential backoff from 1 s to
    32 s) before a save or restore fails. Orbax builds its tensorstore contexts from these two
    module-level defaults and offers no option for it."""
    retries = {"max_retries": int(max_retries), "initial_delay": "1s", "max_delay": "32s"}
    for context in (_ts_utils._BASE_TS_CONTEXT, _ts_utils._DEFAULT_OCDBT_TS_CONTEXT):
        context["gcs_request_retries"] = retries


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FingerprintHandler(ocp.JsonCheckpointHandler):
    """Writes the checksums as JSON in Orbax's background save thread: one per array, plus
    digests of the other items (keys starting with `#`)."""

    def __init__(self):
        super().__init__(filename="fingerprint.json")

    async def _save_fn(self, x, directory):
        names, sums, digests = x
        sums = {n: int(s) for n, s in zip(names, jax.device_get(sums))}
        await super()._save_fn({**sums, **digests}, directory)


@ocp.args.register_with_handler(FingerprintHandler, for_save=True)
@dataclasses.dataclass
class FingerprintSave(ocp.args.CheckpointArgs):
    item: Any  # (names, checksums still on the devices, {"#item": digest})


@ocp.args.register_with_handler(FingerprintHandler, for_restore=True)
@dataclasses.dataclass
class FingerprintRestore(ocp.args.CheckpointArgs):
    """Orbax wants a restore pairing; `verify.read_fingerprint` reads the file directly."""


class _InBackground(_serialization.SerializationStatusCallback):
    """Every array's device-to-host transfer runs in Orbax's background commit
    (ASYNCHRONOUS_DEPRIORITIZED) instead of inside `save`. Only safe for arrays nothing else
    will donate or overwrite: `Checkpointer.save` hands Orbax a private on-device copy."""

    def key_priority(self, keypath) -> _serialization.TransferPriority:
        return _serialization.TransferPriority.ASYNCHRONOUS_DEPRIORITIZED


class StateHandler(ocp.StandardCheckpointHandler):
    """Orbax's standard PyTree handler with the host transfers in the background commit."""

    def __init__(self):
        super().__init__()
        registry = ocp.type_handlers.create_type_handler_registry(
            (jax.Array, ocp.type_handlers.ArrayHandler(
                array_metadata_store=_array_metadata.Store(), callback=_InBackground())),
        )
        self._impl = ocp.PyTreeCheckpointHandler(
            type_handler_registry=registry, save_device_host_concurrent_gb=_IN_FLIGHT_GB)


@ocp.args.register_with_handler(StateHandler, for_save=True)
@dataclasses.dataclass
class StateSave(ocp.args.StandardSave):
    pass


@ocp.args.register_with_handler(StateHandler, for_restore=True)
@dataclasses.dataclass
class StateRestore(ocp.args.StandardRestore):
    """A manager keeps one handler per item: restoring through it needs its own args class."""


class IteratorSnapshot:
    """The iterator's position taken when `save` is called, so an async save that runs later
    cannot record a position the loop has moved past."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


def _iterator_file(directory) -> Any:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class IteratorHandler(grain.checkpoint.CheckpointHandler, ocp.AsyncCheckpointHandler):
    """grain's iterator checkpoint, written in Orbax's background commit (grain's own `save` is
    synchronous and Orbax runs it in a thread the training loop waits for), with a SHA-256 of
    each process's file beside it that `restore` checks (an edited position is refused)."""

    async def _write(self, directory, snapshot: IteratorSnapshot) -> None:
        path = _iterator_file(directory)
        path.write_text(snapshot.get_state().decode())
        (directory / (path.name + ".sha256")).write_text(digest(snapshot.get_state()))

    async def async_save(self, directory, args) -> list:
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write(directory, args.item), name="data_iterator_save")]

    def restore(self, directory, item=None, args=None):
        path = _iterator_file(directory)
        recorded = directory / (path.name + ".sha256")
        if path.exists() and recorded.exists():  # checkpoints before digests have none
            if digest(path.read_bytes()) != recorded.read_text().strip():
                raise Corrupt(f"the data iterator position {path.name} differs from the one saved")
        return super().restore(directory, item, args)


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    item: IteratorSnapshot


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    item: Any
