"""The engine's device steps as traced functions (the engine compiles them ahead of time with
its shardings, `infra.serve.engine`): a batched prefill of prompt chunks, and one decode step
over every slot. Each draws the next token per sequence with its log-probability and the
`TOP_LOGPROBS` likeliest alternatives; a prefill can also score its prompt tokens.

The slot state is a dict of (slots,) arrays: last token, position, active flag, sampling
parameters, seed words (slots, 2) and adapter index.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infra.models import lora
from infra.serve import forward, sampling

TOP_LOGPROBS = 20  # alternatives computed per position (OpenAI's `top_logprobs` at most 20)
# what each row of a prefill call carries (host numpy arrays with a leading rows axis)
PREFILL_FIELDS = {"tokens": np.int32, "start": np.int32, "length": np.int32, "slot": np.int32,
                  "temperature": np.float32, "top_k": np.int32, "top_p": np.float32,
                  "seed": np.uint32, "score": np.bool_, "adapter": np.int32, "after": np.int32,
                  "final": np.bool_, "table": np.int32}


def prefill_rows(rows: int, bucket: int, pages_per_seq: int) -> dict[str, np.ndarray]:
    """Empty prefill inputs for `rows` chunks of `bucket` tokens: a row left empty has length 0
    (its writes go to the trash page) and is not final (it changes no slot)."""
    shapes = {"tokens": (rows, bucket), "seed": (rows, 2), "table": (rows, pages_per_seq)}
    out = {k: np.zeros(shapes.get(k, (rows,)), dt) for k, dt in PREFILL_FIELDS.items()}
    out["top_p"][:] = 1.0
    return out


def prefill(model_def, allowed: np.ndarray, stacked: bool) -> Callable:
    """`run(params, cache, state, rows) -> (cache, state, first, (logprob, top_ids, top_values),
    prompt_scores)`: each row's chunk (`prefill_rows`) goes into its sequence's pages; a row
    whose chunk ends its prompt (`final`) draws the first token and its slot starts decoding.
    With any row's `score`, every row's prompt tokens are scored ((rows, bucket) and
    (rows, bucket, K) twice); otherwise that work is skipped under a `lax.cond`."""

    def run(params, cache, state, rows):
        model = model_def.merge(params)
        if stacked:
            lora.select_adapters(model, rows["adapter"])
        tokens, length = rows["tokens"], rows["length"]
        n, bucket = tokens.shape
        cache, logits, x = forward.prefill(model, cache, tokens, rows["start"], length,
                                           rows["table"])
        end = rows["start"] + length
        ok = jnp.asarray(allowed)
        first = sampling.sample(logits, ok, rows["temperature"], rows["top_k"], rows["top_p"],
                                sampling.keys_at(rows["seed"], end))
        drawn = sampling.logprobs_of(logits, first, ok, TOP_LOGPROBS)
        # each position's next prompt token; a chunk's last: the first of the next chunk
        targets = jnp.roll(tokens, -1, axis=1).at[jnp.arange(n), length - 1].set(rows["after"])

        def score():
            out = forward.prompt_logprobs(model, x.reshape(1, n * bucket, -1),
                                          targets.reshape(-1), ok, TOP_LOGPROBS)
            return tuple(a.reshape(n, bucket, *a.shape[1:]) for a in out)

        def skip():
            return (jnp.zeros((n, bucket), jnp.float32),
                    jnp.zeros((n, bucket, TOP_LOGPROBS), jnp.int32),
                    jnp.zeros((n, bucket, TOP_LOGPROBS), jnp.float32))

        prompt = jax.lax.cond(rows["score"].any(), score, skip)  # only for `echo` requests
        new = {"tokens": first, "pos": end, "active": jnp.ones(n, bool)} | {
            k: rows[k] for k in ("temperature", "top_k", "top_p", "seed", "adapter")}
        # rows that do not finish a prompt write out of bounds: dropped
        slot = jnp.where(rows["final"], rows["slot"], state["pos"].shape[0])
        state = {k: state[k].at[slot].set(new[k], mode="drop") for k in state}
        return cache, state, first, drawn, prompt

    return run


def decode(model_def, allowed: np.ndarray, stacked: bool, max_len: int) -> Callable:
    """`run(params, cache, state, table) -> (cache, state, tokens, (logprobs, top_ids,
    top_values))`: one token for every slot (an inactive slot's is drawn and ignored); an
    active slot advances one position, not beyond the context's last."""

    def run(params, cache, state, table):
        model = model_def.merge(params)
        if stacked:
            lora.select_adapters(model, state["adapter"])
        pos = state["pos"]
        cache, logits = forward.decode(model, cache, state["tokens"], pos, state["active"], table)
        nxt = pos + 1
        ok = jnp.asarray(allowed)
        new = sampling.sample(logits, ok, state["temperature"], state["top_k"], state["top_p"],
                              sampling.keys_at(state["seed"], nxt))
        active = state["active"] & (nxt < max_len)
        state = {**state, "tokens": jnp.where(active, new, state["tokens"]),
                 "pos": jnp.where(active, nxt, pos)}
        return cache, state, new, sampling.logprobs_of(logits, new, ok, TOP_LOGPROBS)

    return run
