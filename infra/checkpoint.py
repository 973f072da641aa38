"""Orbax checkpoints of the train state, the data-iterator position and JSON metadata.

A checkpoint is `<workdir>/checkpoints/<step>/` with three items: `state` (params, optimizer
state, step, rng; tensorstore arrays), `data` (the grain iterator state, JSON) and `meta` (JSON:
step, config, versions). No pickle anywhere. Restoring uses abstract targets that carry the
*current* mesh's shardings, so a checkpoint saved on one mesh loads onto another.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

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


class _IteratorSnapshot:
    """The iterator's position taken when `save` is called, so an async save that runs later
    cannot record a position the loop has moved past. grain's handler writes it per process."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    """Saves every `every` steps (asynchronously) and on demand, keeps the last `keep`."""

    def __init__(self, workdir: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                save_interval_steps=every,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, meta: dict, *, force: bool = False) -> bool:
        """Start saving `step` if it is on the interval (or `force`); returns whether it did."""
        meta = {
            "step": int(step),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "versions": _versions(),
            "process_count": jax.process_count(),
            **meta,
        }
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """Restore `step` onto the shardings in `abstract_state`. With `data_iterator`, its
        position is restored in place too (the checkpoint must come from as many processes)."""
        items = dict(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore(),
        )
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, dict(restored.meta)

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of one checkpoint, without touching the arrays."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def wait(self) -> None:
        """Block until every started save has committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
