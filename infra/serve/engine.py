"""The inference engine: a KV cache of `slots` sequences, prefill of prompt chunks into
slots, one decode step over every slot, each step a precompiled executable.

    engine = Engine.from_workdir("runs/tiny", slots=8)
    engine.warmup()                      # compiles every prefill shape and the decode step
    first, logprob = engine.insert(slot, ids, SamplingParams(temperature=0))
    tokens, logprobs = engine.step()     # one new token for every slot, numpy (slots,) each
    ids, values = engine.top_logprobs()  # the 20 likeliest at the last step, on demand
    engine.release(slot)

Shapes are fixed so that nothing compiles after start-up: prompt chunks are padded to a bucket
(powers of two from 16 up to `prefill_chunk`, and that itself; one chunk per call, or up to
`prefill_rows` short prompts together in the buckets where they fit), the decode step always
runs all slots (a free slot decodes a token nobody reads: cheaper than a recompile), and every
function is compiled ahead of time (`jit(...).lower(...).compile()`), so a call with an
unexpected shape fails loudly instead of compiling. The device state of a slot is its last
token, position, active flag and sampling parameters; stop conditions that need text (stop
strings, max_tokens) are the scheduler's (`infra/serve/scheduler.py`). Each drawn token comes
with its log-probability under the model (float32 log-softmax of the logits, before temperature
and truncation: what an OpenAI `logprobs` field and an RL learner's importance ratio use), and
the 20 likeliest alternatives (`top_logprobs`); a prefill can also score the prompt's own
tokens (`prompt_logprobs`: OpenAI's `echo`, evaluation harnesses' log-likelihoods). Both are
computed in the compiled steps and copied to the host only when asked for; the prompt's scores
run under a `lax.cond`, so a prefill that does not ask pays nothing for them.

Layout: the cache is paged, ``[layers, pages, page_size, kv_heads, head_dim]`` (keys and
values, float or int8: `infra.serve.kv_cache`; `infra.serve.pages` keeps which sequence holds
which page, `forward` writes and gathers them): kv heads go on ``tensor`` like the k / v
weights, so each device reads only its heads' cache; pages are not split over the data axes. The slot state is the decode batch (``batch``
-> data axes). A prompt is admitted (`admit`: pages, its cached prefix shared), prefilled
chunk by chunk (`prefill`), then decodes; `grow` gives decoding slots their next page. The
model is restored onto the serving mesh by `infra.serve.loading.load_model`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infra import paths, sharding
from infra.data.tokenizer import load_tokenizer
from infra.errors import UserError
from infra.mesh import serve_mesh
from infra.run import load_config
from infra.serve import adapters as serve_adapters
from infra.serve import sampling, steps
from infra.serve import kv_cache as kv_cache_lib
from infra.serve.loading import allowed_ids, load_model
from infra.serve.pages import PagePool
from infra.serve.quantize import quantize_weights

log = logging.getLogger(__name__)
MIN_BUCKET = 16
PAGE_SIZE = 16  # positions per KV-cache page (vLLM's default block size)
# the most prompt tokens one prefill call computes, by backend: small on CPU, where a chunk costs
# many decode steps (docs/benchmarks.md "chunked prefill"); on accelerators prefill is cheap
PREFILL_CHUNK = {"cpu": 64}
PREFILL_CHUNK_DEFAULT = 512
PREFILL_ROWS = 8  # the most short prompts one prefill call runs together
TOP_LOGPROBS = steps.TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling: temperature 0 = greedy; top_k 0 = all; top_p 1 = all."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


@dataclasses.dataclass
class _Prefill:
    """A slot's prompt being prefilled: its ids, how many are done (cached pages count)."""

    ids: np.ndarray
    done: int
    sampling: SamplingParams
    score: bool
    adapter: int
    hashes: list[bytes]  # of its full pages (`PagePool.hashes`); marked as being computed
    computing: list[bytes]  # (`PagePool.begin`) unless `score`
    scores: list = dataclasses.field(default_factory=list)  # per chunk, with `score`


def buckets(max_len: int, smallest: int = MIN_BUCKET) -> list[int]:
    """Prompt lengths compiled: powers of two from `smallest` below `max_len`, then `max_len`."""
    out, b = [], min(smallest, max_len)
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def prefill_shapes(chunk: int, rows: int) -> list[tuple[int, int]]:
    """(rows, bucket) of the prefills compiled: one prompt chunk in every bucket, and `rows`
    short prompts together in the buckets where they fit `chunk` tokens."""
    sizes = buckets(chunk)
    return [(1, b) for b in sizes] + [(rows, b) for b in sizes if 1 < rows and rows * b <= chunk]


class Engine:
    """KV cache + slot state on the devices; prefill / decode / release as compiled steps."""

    def __init__(self, model_def, params: Any, config, *, mesh: Mesh, rules, slots: int,
                 allowed: np.ndarray, max_len: int | None = None, adapters: int = 0,
                 page_size: int = PAGE_SIZE, num_pages: int | None = None,
                 prefill_chunk: int | None = None, prefill_rows: int = PREFILL_ROWS,
                 kv_cache: str = "auto"):
        """`adapters` > 0: `params` hold that many LoRA adapters stacked
        (`infra.serve.adapters`); each request picks one (`insert(..., adapter=)`).
        `page_size` positions per cache page (the context: a dense cache); `num_pages` in all
        (default: every slot's whole context, plus the trash page); prompts are prefilled in
        chunks of at most `prefill_chunk` tokens (default: by backend, `PREFILL_CHUNK`), up to
        `prefill_rows` short prompts in one call (as many as fit `prefill_chunk` in buckets of
        at least 16 tokens); `kv_cache`: its storage (`infra.serve.kv_cache`)."""
        self.config = config
        self.mesh, self.rules = mesh, rules
        self.slots = int(slots)
        self.max_len = int(max_len or config.model.max_seq_len)
        self.page_size = int(min(page_size, self.max_len))
        self.pages_per_seq = -(-self.max_len // self.page_size)
        num_pages = int(num_pages or self.slots * self.pages_per_seq + 1)
        if num_pages < self.pages_per_seq + 1:
            raise UserError(f"a KV cache of {num_pages} pages cannot hold one {self.max_len}-"
                            f"token sequence ({self.pages_per_seq} pages of {self.page_size} "
                            "positions, plus the trash page); give it more pages")
        self.pool = PagePool(num_pages, self.page_size)
        if prefill_chunk is None:
            prefill_chunk = PREFILL_CHUNK.get(mesh.devices.flat[0].platform, PREFILL_CHUNK_DEFAULT)
        self.prefill_chunk = int(min(prefill_chunk, self.max_len))
        self.prefill_rows = max(1, min(int(prefill_rows), self.slots,
                                       self.prefill_chunk // MIN_BUCKET))
        self.prefill_shapes = prefill_shapes(self.prefill_chunk, self.prefill_rows)
        self.params = params
        self._model_def = model_def
        self.adapters = int(adapters)
        self._allowed = np.asarray(allowed, bool)
        m = config.model
        dtype = jnp.dtype(m.dtype)
        shape = (int(m.num_layers), num_pages, self.page_size, int(m.num_kv_heads),
                 int(m.head_dim))
        self._slot_sharding = self._sharding(("batch",), (self.slots,))
        self._seed_sharding = self._sharding(("batch", None), (self.slots, 2))
        self._top_sharding = self._sharding(("batch", None), (self.slots, TOP_LOGPROBS))
        self._replicated = NamedSharding(mesh, P())
        self._cache_abstract = kv_cache_lib.abstract(shape, dtype, kv_cache, self._sharding)
        self._cache_sharding = {k: s.sharding for k, s in self._cache_abstract.items()}
        self.cache = kv_cache_lib.zeros(self._cache_abstract)
        self.state = self._initial_state()
        # host bookkeeping: each slot's pages (its block-table row), its prompt still to
        # prefill, and where its next token goes
        self.table = np.zeros((self.slots, self.pages_per_seq), np.int32)
        self._table_device = None
        self.slot_pages: list[list[int]] = [[] for _ in range(self.slots)]
        self.pending: list[_Prefill | None] = [None] * self.slots
        self.position = np.zeros(self.slots, np.int64)
        self.decoding = np.zeros(self.slots, bool)
        self._param_shardings = jax.tree.map(lambda x: x.sharding, params)
        self._prefills: dict[tuple[int, int], Any] = {}
        self._decode = self._release = None
        self._top = None  # device outputs of the last step / prefill
        self._prompts: dict[int, tuple] = {}  # a slot's prompt scores, until taken
        self.compile_seconds = 0.0

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_workdir(cls, workdir: paths.PathLike, *, slots: int = 8, mesh: Mesh | None = None,
                     step: int | None = None, max_len: int | None = None,
                     adapters: dict[str, paths.PathLike] | None = None,
                     quantize: str = "none", **cache: Any) -> "Engine":
        """The engine of the newest checkpoint in `workdir` (trained, fine-tuned or imported),
        with the run's tokenizer (`engine.tokenizer`); `adapters` {name: LoRA workdir}: served
        beside it (adapter 0 is `workdir` itself, then these in order); `quantize`: the
        projection weights' format (`infra.serve.quantize`); `cache`: the paged cache's
        `page_size`, `num_pages`, `prefill_chunk`."""
        if slots < 1:
            raise UserError(f"--slots must be >= 1, got {slots}")
        config = load_config(workdir)
        mesh = mesh or serve_mesh(config)
        config, model_def, params, step, rules = load_model(workdir, mesh, step=step)
        stacked = 0
        if adapters:
            params, model_def, stacked = serve_adapters.stack(workdir, config, params, adapters,
                                                              mesh)
        params = quantize_weights(params, model_def, quantize)
        tok = load_tokenizer(config.data.tokenizer)
        limit = int(config.model.max_seq_len)
        if max_len is not None and not 1 < max_len <= limit:
            raise UserError(f"--max_len must be in [2, {limit}] (model.max_seq_len), got {max_len}")
        engine = cls(model_def, params, config, mesh=mesh, rules=rules, slots=slots,
                     allowed=allowed_ids(tok, int(config.model.vocab_size)), max_len=max_len,
                     adapters=stacked, **cache)
        engine.tokenizer, engine.step_restored, engine.workdir = tok, step, paths.path(workdir)
        log.info("engine: checkpoint step %d of %s, %d slots x %d tokens, KV cache %d pages x "
                 "%d positions (%.1f MiB), mesh %s", step, workdir, slots, engine.max_len,
                 engine.pool.num_pages, engine.page_size, engine.cache_bytes() / 2**20,
                 dict(mesh.shape))
        return engine

    def _sharding(self, logical, shape) -> NamedSharding:
        spec = sharding.logical_to_spec(logical, self.rules)
        return NamedSharding(self.mesh, sharding.fit_spec(spec, shape, self.mesh))

    def _initial_state(self) -> dict:
        s = self.slots
        host = {"tokens": np.zeros(s, np.int32), "pos": np.zeros(s, np.int32),
                "active": np.zeros(s, bool), "temperature": np.zeros(s, np.float32),
                "top_k": np.zeros(s, np.int32), "top_p": np.ones(s, np.float32),
                "adapter": np.zeros(s, np.int32)}
        state = {k: jax.device_put(v, self._slot_sharding) for k, v in host.items()}
        state["seed"] = jax.device_put(np.zeros((s, 2), np.uint32), self._seed_sharding)
        return state

    def _state_shardings(self) -> dict:
        return {k: self._seed_sharding if k == "seed" else self._slot_sharding for k in self.state}

    # --- the compiled steps -------------------------------------------------------------------
    def _compile(self, fn, args, in_shardings, out_shardings, donate):
        start = time.perf_counter()

        def traced(*a):
            with sharding.activation_rules(self.mesh, self.rules):
                return fn(*a)

        jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate)
        compiled = jitted.lower(*args).compile()
        self.compile_seconds += time.perf_counter() - start
        return compiled

    def _abstract(self, tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            tree, shardings)

    def _prefill_fn(self, rows: int, bucket: int):
        if (rows, bucket) in self._prefills:
            return self._prefills[rows, bucket]
        run = steps.prefill(self._model_def, self._allowed, bool(self.adapters))
        r = self._replicated
        host = steps.prefill_rows(rows, bucket, self.pages_per_seq)
        args = (self._abstract(self.params, self._param_shardings),
                self._cache_abstract,
                self._abstract(self.state, self._state_shardings()),
                {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=r) for k, v in host.items()})
        cache_sh = self._cache_sharding
        compiled = self._compile(
            run, args, (self._param_shardings, cache_sh, self._state_shardings(), r),
            (cache_sh, self._state_shardings(), r, (r,) * 3, (r,) * 3), donate=(1, 2))
        self._prefills[rows, bucket] = compiled
        return compiled

    def _decode_fn(self):
        if self._decode is not None:
            return self._decode
        run = steps.decode(self._model_def, self._allowed, bool(self.adapters), self.max_len)
        cache_sh = self._cache_sharding
        args = (self._abstract(self.params, self._param_shardings),
                self._cache_abstract,
                self._abstract(self.state, self._state_shardings()),
                jax.ShapeDtypeStruct(self.table.shape, jnp.int32, sharding=self._replicated))
        self._decode = self._compile(
            run, args, (self._param_shardings, cache_sh, self._state_shardings(),
                        self._replicated),
            (cache_sh, self._state_shardings(), self._slot_sharding,
             (self._slot_sharding, self._top_sharding, self._top_sharding)),
            donate=(1, 2))
        return self._decode

    def _release_fn(self):
        if self._release is None:
            def run(state, slot):
                return {**state, "active": state["active"].at[slot].set(False)}

            args = (self._abstract(self.state, self._state_shardings()),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated))
            self._release = self._compile(run, args, (self._state_shardings(), self._replicated),
                                          self._state_shardings(), donate=(0,))
        return self._release

    def compile(self, buckets=None) -> float:
        """Compile the prefills of `buckets` (default: every bucket; one chunk and, where
        compiled, several short prompts together), the decode step and release (each once: a
        second call compiles nothing). Returns the seconds spent compiling so far."""
        for rows, b in self.prefill_shapes:
            if buckets is None or b in buckets:
                self._prefill_fn(rows, b)
        self._decode_fn()
        self._release_fn()
        return self.compile_seconds

    def warmup(self) -> float:
        """Compile every prefill shape, the decode step and release; run one prefill and a
        decode step. Returns the seconds spent compiling (all of it: nothing compiles later)."""
        self.compile()
        self.insert(0, np.zeros(1, np.int32), SamplingParams(temperature=1.0, top_k=5, top_p=0.9),
                    score_prompt=True)
        self.step()
        self.release(0)
        return self.compile_seconds

    # --- host API -----------------------------------------------------------------------------
    def bucket_for(self, length: int, rows: int = 1) -> int:
        """The smallest compiled bucket for `rows` chunks of at most `length` tokens."""
        for r, b in self.prefill_shapes:
            if r == rows and length <= b:
                return b
        raise UserError(f"no prefill of {rows} chunk(s) of {length} tokens is compiled "
                        f"(shapes {self.prefill_shapes})")

    def admit(self, slot: int, ids: np.ndarray, sp: SamplingParams, *,
              score_prompt: bool = False, adapter: int = 0) -> bool:
        """Give free `slot` the pages of prompt `ids` (1 <= len < max_len): its cached prefix
        pages shared (unless `score_prompt`: every prompt token is computed), new ones for the
        rest. False (nothing changed) when there are not enough free pages, or when its prefix
        is being prefilled in another slot: try again next step. Then `prefill(slot)` until it
        returns the first token."""
        n = len(ids)
        if not 0 < n < self.max_len:
            raise UserError(f"a prompt must have 1 to {self.max_len - 1} tokens, got {n}")
        if not 0 <= adapter < max(self.adapters, 1):
            raise UserError(f"adapter {adapter} is not one of the {self.adapters} served")
        size = self.page_size
        hashes = self.pool.hashes(ids, adapter)
        cached = [] if score_prompt else self.pool.lookup(hashes[:(n - 1) // size])
        if cached is None:  # its next prefix page is being prefilled in another slot
            return False
        need = -(-n // size) - len(cached)
        if self.pool.available() < need:
            self.pool.release(cached)
            return False
        pages = cached + [self.pool.allocate() for _ in range(need)]
        self._set_pages(slot, pages)
        self.pending[slot] = _Prefill(np.asarray(ids, np.int32), len(cached) * size, sp,
                                      score_prompt, adapter, hashes,
                                      [] if score_prompt else self.pool.begin(hashes))
        return True

    def prompt_left(self, slot: int) -> int:
        """Tokens of `slot`'s prompt not prefilled yet."""
        job = self.pending[slot]
        return len(job.ids) - job.done

    def prefill_group(self, order: Sequence[int]) -> list[int]:
        """The slots one prefill call runs next: the first of `order` with a prompt pending,
        joined, when all of its prompt left fits a compiled several-row bucket, by the next
        pending ones whose prompts fit too (up to `prefill_rows` in all)."""
        waiting = [s for s in order if self.pending[s] is not None]
        small = max((b for r, b in self.prefill_shapes if r > 1), default=0)
        if not waiting or self.prompt_left(waiting[0]) > small:
            return waiting[:1]
        return [s for s in waiting if self.prompt_left(s) <= small][:self.prefill_rows]

    def prefill(self, slots: Sequence[int]) -> list[tuple[int, float] | None]:
        """Run the next chunk of each of `slots`' prompts in one call (one slot: at most
        `prefill_chunk` tokens; several: short prompts, `prefill_group`). Per slot: None while
        more of its prompt remains, else its first token and that token's log-probability (the
        slot then decodes). A prompt admitted with `score_prompt` has its scores in
        `prompt_logprobs(slot)` after its last chunk; `top_logprobs` has the first tokens'
        alternatives, row i for slots[i]."""
        rows = 1 if len(slots) == 1 else self.prefill_rows
        lengths = [min(self.prompt_left(s), self.prefill_chunk) for s in slots]
        bucket = self.bucket_for(max(lengths), rows)
        host = steps.prefill_rows(rows, bucket, self.pages_per_seq)
        host["slot"][:] = self.slots  # empty rows change no slot
        for i, (slot, length) in enumerate(zip(slots, lengths)):
            job = self.pending[slot]
            start, end, sp = job.done, job.done + length, job.sampling
            final = end == len(job.ids)
            values = {"start": start, "length": length, "slot": slot, "final": final,
                      "temperature": sp.temperature, "top_k": sp.top_k, "top_p": sp.top_p,
                      "seed": sampling.seed_words(sp.seed), "score": job.score,
                      "adapter": job.adapter, "after": 0 if final else job.ids[end],
                      "table": self.table[slot]}
            for k, v in values.items():
                host[k][i] = v
            host["tokens"][i, :length] = job.ids[start:end]
        self.cache, self.state, first, (logprob, *top), scores = self._prefill_fn(rows, bucket)(
            self.params, self.cache, self.state, jax.device_put(host, self._replicated))
        self._top = tuple(top)
        first, logprob = np.asarray(first), np.asarray(logprob)
        scored = host["score"].any()
        scores = tuple(np.asarray(a) for a in scores) if scored else None
        out = []
        for i, (slot, length) in enumerate(zip(slots, lengths)):
            job = self.pending[slot]
            job.done += length
            if job.score:
                job.scores.append(tuple(a[i, :length] for a in scores))
            if not host["final"][i]:
                out.append(None)
                continue
            self.pending[slot] = None
            self.pool.register(job.hashes, self.slot_pages[slot])
            self.pool.end(job.computing)
            if job.score:
                self._prompts[slot] = tuple(np.concatenate(parts)[:len(job.ids) - 1]
                                            for parts in zip(*job.scores))
            self.position[slot], self.decoding[slot] = len(job.ids), True
            out.append((int(first[i]), float(logprob[i])))
        return out

    def insert(self, slot: int, ids: np.ndarray, sp: SamplingParams, *,
               score_prompt: bool = False, adapter: int = 0) -> tuple[int, float]:
        """`admit` + every `prefill` chunk: the prompt's first token and its log-probability.
        With `score_prompt`, the prompt's own log-probabilities are computed too
        (`prompt_logprobs`); `adapter`: which of the stacked adapters the slot decodes with."""
        if not self.admit(slot, ids, sp, score_prompt=score_prompt, adapter=adapter):
            raise UserError(f"the KV cache has no room for a {len(ids)}-token prompt "
                            f"({self.pool.available()} pages free)")
        while (out := self.prefill([slot])[0]) is None:
            pass
        return out

    def set_params(self, params: Any) -> None:
        """Serve new weights (same shapes and shardings): cached prefix pages, computed with
        the old ones, are dropped."""
        self.params = params
        self.pool.forget()

    def grow(self) -> list[int]:
        """Give every decoding slot the page its next token goes to; the slots that could not
        get one (all pages held: the scheduler preempts)."""
        starved = []
        for slot in np.flatnonzero(self.decoding):
            if self.position[slot] // self.page_size >= len(self.slot_pages[slot]):
                page = self.pool.allocate()
                if page is None:
                    starved.append(int(slot))
                else:
                    self._set_pages(slot, self.slot_pages[slot] + [page])
        return starved

    def step(self) -> tuple[np.ndarray, np.ndarray]:
        """One decode step over every slot: the next token of each and its log-probability
        (numpy, (slots,) each); only the decoding slots' are meaningful. Each decoding slot
        advances one position (not beyond the context's last). Call `grow` first."""
        if self._table_device is None:
            self._table_device = jax.device_put(self.table, self._replicated)
        self.cache, self.state, tokens, (logprobs, *top) = self._decode_fn()(
            self.params, self.cache, self.state, self._table_device)
        self._top = tuple(top)
        self.position = np.where(self.decoding & (self.position + 1 < self.max_len),
                                 self.position + 1, self.position)
        return np.asarray(tokens), np.asarray(logprobs)

    def _set_pages(self, slot: int, pages: list[int]) -> None:
        self.slot_pages[slot] = pages
        self.table[slot] = 0
        self.table[slot, :len(pages)] = pages
        self._table_device = None

    def top_logprobs(self) -> tuple[np.ndarray, np.ndarray]:
        """The `TOP_LOGPROBS` most likely ids (that may be drawn) and their log-probabilities,
        most likely first, at the positions of the last `prefill`'s rows ((rows, K) each) or
        `step`'s slots ((slots, K)): fetched from the device only when asked."""
        return np.asarray(self._top[0]), np.asarray(self._top[1])

    def prompt_logprobs(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Taken once, after the prefill of `slot`'s prompt (n tokens, admitted with
        `score_prompt`): the log-probability of each prompt token after the first ((n - 1,)),
        and the top `TOP_LOGPROBS` (ids, log-probabilities) at those positions ((n - 1, K)
        each)."""
        return self._prompts.pop(slot)

    def release(self, slot: int) -> None:
        """Free `slot`: it stops decoding and its pages go back to the pool (prefix pages stay
        cached for later prompts)."""
        self.pool.release(self.slot_pages[slot])
        self._set_pages(slot, [])
        if self.pending[slot] is not None:
            self.pool.end(self.pending[slot].computing)
        self.pending[slot] = None
        self._prompts.pop(slot, None)
        self.decoding[slot] = False
        self.state = self._release_fn()(self.state, jax.device_put(np.int32(slot),
                                                                  self._replicated))

    # --- figures for the benchmark --------------------------------------------------------------
    def decode_bytes(self) -> int:
        """Bytes a decode step must read at least: every parameter, and every slot's whole
        context of keys and values (the step's shapes are fixed)."""
        params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        per_page = self.cache_bytes() / self.pool.num_pages
        return params + int(self.slots * self.pages_per_seq * per_page)

    def cache_bytes(self) -> int:
        """Device bytes of the KV cache (keys and values, every page)."""
        return kv_cache_lib.nbytes(self._cache_abstract)
