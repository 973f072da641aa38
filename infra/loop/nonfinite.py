"""NaN/Inf in a step: the update is never applied (the step keeps the old state); this part
decides what the loop does next, by `train.nonfinite`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from infra.errors import NumericalError

log = logging.getLogger("infra.train")


class NonFiniteGuard:
    """`check(records)` on host metrics `(step, {"loss", "grad_norm", "skipped", ...})`:
    mode "stop" raises NumericalError at the first skipped step; "skip" warns for each."""

    def __init__(self, mode: str, latest_checkpoint: Callable[[], int | None]):
        self.mode = mode
        self._latest_checkpoint = latest_checkpoint

    def check(self, records: list[tuple[int, dict]]) -> None:
        bad = [(s, m) for s, m in records if m["skipped"]]
        if not bad:
            return
        if self.mode == "stop":
            s, m = bad[0]
            latest = self._latest_checkpoint()
            latest = "no checkpoint yet" if latest is None else f"latest: step {latest}"
            raise NumericalError(
                f"non-finite loss, gradients or update at step {s} ({self._describe(m)}); it was "
                f"not applied and no checkpoint holds it ({latest}); lower optim.lr or raise "
                "optim.grad_clip", key="train.nonfinite", value="skip", verb="or set")
        for s, m in bad:
            log.warning("warning: non-finite loss, gradients or update at step %d (%s); update "
                        "skipped",
                        s, self._describe(m))

    @staticmethod
    def _describe(metrics: dict) -> str:
        return ", ".join(f"{k}={metrics[k]}" for k in ("loss", "grad_norm", "update_norm")
                         if k in metrics)
