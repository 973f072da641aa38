"""Per-step metrics stay on the devices until the loop needs them.

Reading a metric forces the host to wait for that step; the loop only does so at sync points
(logging, saving), then fetches every step since the last one in a single transfer. Between
them it waits for each step's predecessor only (`wait_for_previous`), which bounds how far
dispatch runs ahead without ever leaving the devices without queued work.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


class PendingMetrics:
    """`(step, metrics)` of the steps since the last `pop_mean`, on the devices until `fetch`."""

    def __init__(self):
        self._records: list[tuple[int, Any]] = []
        self._fetched = 0  # how many of the records are on the host already

    def append(self, step: int, metrics: dict) -> None:
        self._records.append((step, metrics))

    def wait_for_previous(self) -> None:
        """Block until the step before the newest one has finished. The host then runs at most
        one step ahead of the devices (the newest is already queued, so they never idle), and
        what it reads between steps, a SIGTERM above all, is acted on a step later at most
        instead of after every step it had dispatched ahead."""
        if len(self._records) - self._fetched >= 2:
            jax.block_until_ready(self._records[-2][1])

    def fetch(self) -> list[tuple[int, dict]]:
        """The records not fetched before, now on the host (one device-to-host transfer)."""
        new = jax.device_get(self._records[self._fetched:])
        self._records[self._fetched:] = new
        self._fetched = len(self._records)
        return new

    def pop_mean(self) -> dict[str, float]:
        """The mean of every metric over the pending steps; clears them."""
        self.fetch()
        records = [m for _, m in self._records]
        self._records, self._fetched = [], 0
        return {k: float(np.mean([m[k] for m in records])) for k in records[0]}
