"""Preemption: SIGTERM (what TPU VMs and Kubernetes send) ends the run at a step boundary with a
committed checkpoint, exit 75; the next run of the same command resumes.

The signal itself only raises a flag (`infra.process.SigtermFlag`; the CLI installs the
process's own first thing, `infra.process.catch_sigterm`). The loop reads the flag between
steps; a SIGTERM during start-up is therefore honoured after the first step, and one during
shutdown lets the run finish. Either way the stop is bounded by the flag's grace time (exit 143).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from infra import process
from infra.errors import Preempted


@contextlib.contextmanager
def sigterm_flag(grace_s: float) -> Iterator[process.SigtermFlag]:
    """The flag the training loop reads: the process's own (so a SIGTERM during start-up
    counts) or, where nobody installed one (a notebook), one installed for the loop only.
    Multi-process runs get a flag that never rises: there JAX's preemption service handles
    SIGTERM and every process stops at the same agreed step."""
    import jax

    caught = process.sigterm_caught()
    if jax.process_count() > 1:
        yield process.SigtermFlag(grace_s)
    elif caught is not None:
        caught.grace_s = grace_s
        yield caught
    else:
        with process.SigtermFlag(grace_s) as flag:
            yield flag


def stopped(checkpointer, step: int) -> Preempted:
    """Wait until the checkpoint of `step` has committed; the exception that ends the run."""
    checkpointer.wait()
    return Preempted(f"stopped at step {step} on SIGTERM; checkpoint written to "
                     f"{checkpointer.directory / str(step)}; run the same command to resume")
