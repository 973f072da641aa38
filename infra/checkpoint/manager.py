"""The checkpoint manager of a training run: save, restore, fall back, preemption.

Saves every `checkpoint.every` steps and/or `every_seconds` (asynchronously), on preemption and
on demand; keeps the last `keep`; restores the newest intact checkpoint onto the *current* mesh's
shardings (abstract targets), so a checkpoint saved on one mesh loads onto another. No pickle
anywhere: arrays are tensorstore files, everything else JSON (layout: `infra.checkpoint.layout`).

Trust: Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoints intact; leftovers are removed on the next
start. Every restore recomputes the checksums (`infra.checkpoint.verify`), so truncated or
altered files are detected instead of loading wrong values; with `checkpoint.fallback` the
previous intact checkpoint is used instead (the bad one is moved aside).
"""

from __future__ import annotations

import datetime
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grain
import jax
import jax.numpy as jnp
from flax import traverse_util
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from infra import paths
from infra.checkpoint import layout
from infra.checkpoint.orbax_handlers import (FingerprintSave, IteratorRestore, IteratorSave,
                                             IteratorSnapshot, StateRestore, StateSave,
                                             set_storage_retries)
from infra.checkpoint.newest import UnreadableStep, newest_intact
from infra.checkpoint.verify import (META_DIGEST, Corrupt, check_fingerprint, check_meta,
                                     first_mismatch, fingerprint_async, meta_digest, saved_specs,
                                     specs)
from infra.errors import CheckpointError, UserError, write_fix

log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    import flax
    import optax

    return {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(ocp, "__version__", "?"),
        "grain": getattr(grain, "__version__", "?"),
    }


@jax.jit
def _copy_all(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


def _copy_on_device(state: Any, shared: frozenset[tuple] = frozenset()) -> Any:
    """A copy of every array where it lives (new buffers: the loop may donate the originals),
    one program; the parameters at `shared` paths, which the loop does not donate (a LoRA run's
    base), are not copied."""
    if not shared:
        return _copy_all(state)
    flat = traverse_util.flatten_dict(state["params"])
    moving = [p for p in flat if p not in shared]
    rest, copies = _copy_all(({k: v for k, v in state.items() if k != "params"},
                              [flat[p] for p in moving]))
    flat.update(zip(moving, copies))
    return {**rest, "params": traverse_util.unflatten_dict(flat)}


class Checkpointer:
    """Saves every `every` steps and/or `every_seconds` (asynchronously), on preemption and on
    demand; keeps the last `keep`; restores the latest intact checkpoint."""

    def __init__(
        self,
        workdir: paths.PathLike,
        *,
        every: int,
        keep: int,
        async_save: bool = True,
        device_copy: bool = True,
        every_seconds: float = 0,
        fallback: bool = True,
        storage_retries: int = 32,
        events=None,
        shared: frozenset[tuple] = frozenset(),
    ):
        workdir = paths.path(workdir)
        set_storage_retries(storage_retries)
        self.directory = layout.checkpoints_dir(workdir if paths.is_remote(workdir) else workdir.resolve())
        self.fallback = fallback
        # `infra.events.EventLog` (process 0 only): commits are recorded as they are seen.
        self._events = events
        self._noted = set(layout.committed_steps(self.directory.parent)) if events else set()
        self._polled = 0.0  # when poll_commits last listed the directory
        # Async saves copy the state on its devices (one more state of device memory until the
        # background transfer has read it) and hand the copy to Orbax from a worker thread;
        # without the copy, `save` waits for Orbax's device-to-host transfer of the live state.
        self._device_copy = async_save and device_copy
        self._shared = shared  # parameter paths the loop never donates: saved without a copy
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="infra-checkpoint")
        # (step, future) of the hand-off to Orbax still running on the worker. Orbax's manager
        # is not thread-safe: every use of it first waits for this (`_join`).
        self._handing_off: tuple[int, Future] | None = None
        self._in_flight: int | None = None  # the step whose async save may still be running
        self._failed = False  # a save failed: writes may still be unwinding in the background
        decisions = [policies.FixedIntervalPolicy(every), policies.PreemptionCheckpointingPolicy()]
        if every_seconds > 0:
            decisions.append(
                policies.ContinuousCheckpointingPolicy(minimum_interval_secs=every_seconds)
            )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=True,
                cleanup_tmp_directories=True,  # unfinished saves of a killed run
                save_decision_policy=policies.AnySavePolicy(decisions),
            ),
        )
        self._remove_uncommitted()

    def _remove_uncommitted(self) -> None:
        """A bucket has no temporary directories: a killed save leaves `<step>/` without its
        commit marker. Orbax skips it when restoring but would write into it when that step is
        saved again, so it goes now (local leftovers are Orbax's own `cleanup_tmp_directories`)."""
        if not paths.is_remote(self.directory):
            return
        if jax.process_index() == 0:
            for step_path in layout.uncommitted_steps(self.directory.parent):
                log.info("removing %s: a save that never committed", step_path)
                step_path.rmtree()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("infra_remove_uncommitted")

    def _join(self) -> None:
        """Wait for the worker's hand-off of the last save to Orbax; raise what it raised."""
        if self._handing_off is None:
            return
        step, future = self._handing_off
        self._handing_off = None
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._write_error(step, e) from None

    def latest_step(self) -> int | None:
        self._join()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self._join()
        return sorted(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        self._join()
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-process run's processes agreed to stop at `step` (SIGTERM)."""
        if jax.process_count() == 1:
            return False
        self._join()
        return self.manager.reached_preemption(step)

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse to start a save that cannot fit: a clean error beats a half-written one (a
        bucket has no such limit to check)."""
        if paths.is_remote(self.directory):
            return
        need = sum(
            shard.data.nbytes
            for leaf in jax.tree.leaves(state)
            for shard in getattr(leaf, "addressable_shards", [])
            if shard.replica_id == 0
        )
        free = shutil.disk_usage(self.directory).free
        if free < need * 1.1 + 2**20:
            try:  # let the saves already under way commit: they fitted
                self.manager.wait_until_finished()
            except Exception:  # noqa: BLE001 - reported below as the same full disk
                pass
            self._failed = True
            raise CheckpointError(
                f"not enough disk space for the checkpoint of step {step} in {self.directory}: "
                f"{free / 2**20:.1f} MiB free, about {need / 2**20:.1f} MiB needed; free disk space "
                f"or use another --workdir (earlier checkpoints are intact)"
            )

    def save(self, step: int, state: Any, data_iterator, meta: dict) -> None:
        """Start saving `step` now (asynchronously); `should_save` says when it is due.

        With the on-device copy, this returns once the copy is made: the loop may then donate
        `state`; Orbax receives the copy on the worker thread and transfers it to the host and
        writes it in its background commit."""
        t0 = time.perf_counter()
        self._join()
        self._note_commits()  # the previous saves that have committed since
        self._check_space(step, state)
        meta = {
            "step": int(step),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _versions(),
            "process_count": jax.process_count(),
            **meta,
        }
        snapshot = IteratorSnapshot(data_iterator)
        failing = self._in_flight or step  # Orbax reports the previous save's failure here
        if self._device_copy:
            copy = jax.block_until_ready(_copy_on_device(state, self._shared))
            self._handing_off = (failing, self._worker.submit(
                self._hand_off, step, StateSave(copy), snapshot, meta))
        else:
            try:
                self._hand_off(step, ocp.args.StandardSave(state), snapshot, meta)
            except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
                raise self._write_error(failing, e) from None
        self._in_flight = step
        if self._events is not None:
            self._events.record("checkpoint_save", step=int(step), seconds=time.perf_counter() - t0)

    def _hand_off(self, step: int, state_args, snapshot: IteratorSnapshot, meta: dict) -> None:
        args = ocp.args.Composite(**{
            layout.STATE: state_args,
            layout.FINGERPRINT: FingerprintSave(
                (*fingerprint_async(state_args.item), {META_DIGEST: meta_digest(meta)})),
            layout.DATA: IteratorSave(snapshot),
            layout.META: ocp.args.JsonSave(meta),
        })
        self.manager.save(step, args=args, force=True)  # first finishes the previous save

    def wait(self) -> None:
        """Block until every started save has committed."""
        t0 = time.perf_counter()
        self._join()
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._in_flight, e) from None
        self._in_flight = None
        self._note_commits()
        if self._events is not None:
            self._events.record("checkpoint_wait", seconds=time.perf_counter() - t0)

    COMMIT_POLL_S = 1.0

    def poll_commits(self) -> None:
        """While a save is committing in the background, look (a listing of the checkpoint
        directory, at most every `COMMIT_POLL_S`) for steps that committed since, so their
        `checkpoint_committed` events carry when they committed, not when the next save came.
        The loop calls it every step; with no save pending it costs nothing."""
        if self._events is None or self._in_flight is None or self._in_flight in self._noted:
            return
        now = time.monotonic()
        if now - self._polled >= self.COMMIT_POLL_S:
            self._polled = now
            self._note_commits()

    def _note_commits(self) -> None:
        """Record in the event log every step newly committed (renamed into place) on disk."""
        if self._events is None:
            return
        try:
            committed = layout.committed_steps(self.directory.parent)
        except Exception:  # noqa: BLE001 - a look, not a write: a storage outage is reported once,
            return  # as the CheckpointError of the save it breaks; these steps are noted later
        for step in committed:
            if step not in self._noted:
                self._events.record("checkpoint_committed", step=step)
                self._noted.add(step)

    def _write_error(self, step, e: Exception) -> CheckpointError:
        self._failed = True
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        cause = cause if len(cause) < 240 else cause[:120] + " ... " + cause[-100:]
        return CheckpointError(
            f"cannot write the checkpoint of step {step} to {self.directory}: {cause}; "
            f"{write_fix(e)} (earlier checkpoints are intact)"
        )

    def close(self) -> None:
        """Finish pending saves and release the manager. Errors were already reported by
        `save`/`wait`; here they are only logged, so they cannot mask the original one."""
        try:
            self._join()
        except CheckpointError as e:
            log.debug("closing the checkpoint manager: %s", e)
        finally:
            self._worker.shutdown()
        if self._failed:  # closing now would tear down Orbax's event loop under failing writes
            return
        try:
            self.manager.wait_until_finished()
            # The removal of a killed run's unfinished saves runs in the background and only
            # `save` waits for it; a run that never saved must not leave it half done either.
            getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            log.debug("closing the checkpoint manager: %s", e)

    # ------------------------------------------------------------------ restoring

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of one checkpoint, without touching the arrays."""
        try:
            return layout.read_meta(self.directory / str(step))
        except (OSError, ValueError) as e:
            raise Corrupt(f"unreadable metadata in {self.directory / str(step)} "
                          f"({type(e).__name__})") from None

    def check_compatible(self, step: int, abstract_state: Any) -> None:
        """UserError when the checkpoint's arrays do not have this model's shapes and dtypes."""
        saved = saved_specs(self.directory / str(step) / layout.STATE)
        here = specs(abstract_state)
        mismatch = first_mismatch(saved, here)
        if mismatch is None:
            return
        name, kind = mismatch
        what = (f"'{name}' is {saved[name]} there but {here[name]} here" if kind == "spec" else
                f"'{name}' exists only in {'this model' if kind == 'missing' else 'the checkpoint'}")
        raise UserError(f"checkpoint step {step} in {self.directory} is from an incompatible "
                        f"model: {what}; train in a new --workdir, or restore the config that "
                        "wrote it")

    def _read(self, step: int, abstract_state: Any, make_iterator) -> tuple[Any, dict, Any]:
        meta = self.read_meta(step)
        check_meta(self.directory / str(step), meta)
        self.check_compatible(step, abstract_state)
        # The saved data position is exact but per process: after a change of process count
        # the iterator starts at the checkpoint's step instead (one global batch per step).
        iterator = make_iterator(step)
        restore = StateRestore if self._device_copy else ocp.args.StandardRestore
        items = {layout.STATE: restore(abstract_state)}
        self._join()
        if meta.get("process_count") == jax.process_count():
            items[layout.DATA] = IteratorRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        check_fingerprint(self.directory / str(step), restored[layout.STATE])
        return restored[layout.STATE], meta, iterator

    def restore_latest(self, abstract_state: Any, make_iterator) -> tuple[Any, dict, Any] | None:
        """Restore the newest intact checkpoint onto `abstract_state`'s shardings; returns
        (state, meta, data iterator positioned after that step), or None without checkpoints.

        `make_iterator(start_step)` builds the task's training iterator. A corrupted checkpoint
        raises CheckpointError naming step and path or, with `fallback`, is moved aside
        (`checkpoints/corrupt-<step>-<time>`) with a warning and the previous one is tried.
        """
        steps = self.all_steps()
        try:
            found = newest_intact(self.all_steps,
                                  lambda step: self._read(step, abstract_state, make_iterator),
                                  step_dir=lambda step: self.directory / str(step),
                                  on_corrupt=self._corrupt)
        except UnreadableStep as e:
            raise CheckpointError(
                f"cannot read checkpoint step {e.step} at {self.directory / str(e.step)}: {e}; "
                f"fix that and run the same command again (nothing was moved: this is not "
                f"corruption)") from None
        if found is not None:
            return found[1]
        if steps:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory} (tried steps {steps}); "
                f"use a new --workdir to start over"
            )
        return None

    def _corrupt(self, step: int, e: Corrupt) -> None:
        """A corrupted checkpoint: stop (no `fallback`), or warn and move it aside."""
        where = self.directory / str(step)
        if not self.fallback:
            raise CheckpointError(
                f"checkpoint step {step} at {where} is corrupted: {e}",
                key="checkpoint.fallback", value="true",
                note=" to resume from the previous good step") from None
        log.warning("warning: checkpoint step %d at %s is corrupted: %s; "
                    "falling back to the previous checkpoint", step, where, e)
        self._move_aside(step)

    def _move_aside(self, step: int) -> None:
        """Keep a corrupted checkpoint for inspection, out of Orbax's sight (in a bucket a
        rename copies every object, then deletes the originals)."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            paths.move_tree(src, self.directory / f"corrupt-{step}-{int(time.time())}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"infra_move_aside_{step}")
        self._join()
        self.manager.reload()
