"""Rollouts from the serving engine in the training process.

The engine (`infra.serve.engine`: paged KV cache, continuous batching, prefix pages shared by
a group's completions) runs on the trainer's devices with the serving layout of the model
(layers unrolled, `serve_mesh`). `sync(params)` copies the trainer's parameters into it in
memory, resharded from the training mesh (and stacked layers, with `model.scan_layers`) to the
serving layout: after it the engine's parameters equal the trainer's bit for bit. `sample`
draws `group` completions per prompt, each with the log-probability of every token it drew
(what the learner's importance ratio and the tests compare against); a completion's seed is
given, so a batch's rollouts depend only on the parameters and the seeds, whatever ran beside
them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np

from infra import run
from infra.mesh import serve_mesh
from infra.models.layers import convert_layers
from infra.serve.engine import MIN_BUCKET, Engine, SamplingParams
from infra.serve.loading import allowed_ids, serving_config
from infra.serve.scheduler import Request, Scheduler


@dataclasses.dataclass
class Completion:
    ids: np.ndarray  # the drawn tokens (int32), ending with EOS when it stopped there
    logprobs: np.ndarray  # of each drawn token under the policy it was drawn from (float32)
    stopped: bool  # ended at EOS (else at the token limit)


class RolloutEngine:
    """A serving engine fed the trainer's parameters (`sync`), sampling completions (`sample`)."""

    def __init__(self, config, devices: Sequence, tokenizer, *, slots: int, max_len: int):
        self.config, self.tok = config, tokenizer
        self.serving = serving_config(config)
        self.mesh = serve_mesh(self.serving, devices=list(devices))
        sharded, self.rules = run.sharded_model(self.serving, self.mesh)
        self.model_def, self.abstract = sharded.model, sharded.abstract["params"]
        self.slots = int(slots)
        step = MIN_BUCKET  # the cache holds whole buckets
        self.max_len = min(int(config.model.max_seq_len), -(-int(max_len) // step) * step)
        self.engine: Engine | None = None
        self.seconds = 0.0  # spent in `sample` (rollout time)
        self.tokens = 0  # completion tokens sampled

    def sync(self, params: dict) -> None:
        """Serve `params` (the trainer's, any layer layout or sharding): a copy on the serving
        mesh, so the trainer may donate its own."""
        copy = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)
        if bool(self.config.model.get("scan_layers", False)):
            copy = convert_layers(copy, int(self.config.model.num_layers), self.abstract)
        placed = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), copy, self.abstract)
        if self.engine is None:
            self.engine = Engine(self.model_def, placed, self.serving, mesh=self.mesh,
                                 rules=self.rules, slots=self.slots,
                                 allowed=allowed_ids(self.tok, int(self.config.model.vocab_size)),
                                 max_len=self.max_len)
        else:
            self.engine.set_params(placed)

    def sample(self, prompts: Sequence[np.ndarray], seeds: np.ndarray, *, max_tokens: int,
               temperature: float, top_k: int = 0) -> list[Completion]:
        """One completion per (prompt, seed): `seeds` (len(prompts),) ints; at most
        `max_tokens` new tokens (and the context)."""
        if self.engine is None:
            raise RuntimeError("sync() the parameters before sampling")
        t0 = time.perf_counter()
        requests = [Request(np.asarray(ids, np.int32),
                            SamplingParams(float(temperature), int(top_k), 1.0, int(seed)),
                            max_tokens=int(max_tokens))
                    for ids, seed in zip(prompts, seeds)]
        scheduler = Scheduler(self.engine, self.tok, max_queue=len(requests))
        scheduler.submit_all(requests)
        scheduler.run_until_idle()
        out = []
        for r in requests:
            ids = np.asarray(r.token_ids, np.int32)
            out.append(Completion(ids, np.asarray(r.logprobs, np.float32),
                                  bool(len(ids)) and int(ids[-1]) == self.tok.eos_id))
        self.seconds += time.perf_counter() - t0
        self.tokens += sum(len(c.ids) for c in out)
        return out
