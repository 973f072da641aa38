"""`python -m infra generate --workdir runs/x --prompt "def "`: sample text from a trained LM.

Runs on the serving engine (`infra.serve`): the parameters of the newest intact checkpoint
(`infra.checkpoint.restore_params`: checksums verified, nothing in the workdir changed) on a
one-slot KV cache as long as the request needs (`context_for`: prompt + new tokens, to a
power of two, at most `model.max_seq_len`); the prompt
(encoded as the tokenizer encodes a text: its BOS where it adds one) is prefilled once, then each new token is one decode step that reads the
cache instead of recomputing the context. Sampling: temperature (0 = greedy), top-k, top-p,
with a key that folds in the seed and the token's position (`infra.serve.sampling`), so the
same seed gives the same text. Text is encoded and decoded with the run's tokenizer
(`data.tokenizer`: bytes by default), which also gives BOS and EOS; every id of the tokenizer
but PAD can be sampled. Stops at EOS, after `max_new_tokens`, or when the
context is full. `--json` prints one JSON object per run.

JAX is imported inside the functions: the CLI applies `--cpu_devices` before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from infra import compile_cache, jsonout, paths
from infra.errors import UserError
from infra.paths import PathLike

log = logging.getLogger(__name__)
_ENGINES: dict = {}  # (model, tokenizer, devices) -> Engine with compiled steps


INT32_MAX, SEED_MAX = 2**31 - 1, 2**63 - 1


def _check_arguments(prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
                     seed: int) -> None:
    """One clear UserError for an argument the sampler cannot take."""
    import math

    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("--prompt is not valid UTF-8 text; pass the prompt as UTF-8") from None
    for name, value, high in (("max_new_tokens", max_new_tokens, INT32_MAX),
                              ("top_k", top_k, INT32_MAX), ("seed", seed, SEED_MAX)):
        if not 0 <= value <= high:
            raise UserError(f"--{name} must be in [0, {high}], got {value}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")


def generate(workdir: PathLike, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Prompt + completion sampled from the newest checkpoint in `workdir`."""
    return prompt + complete(workdir, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed)["text"]


def complete(workdir: PathLike, prompt: str | list[int], *, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0,
             top_p: float = 1.0) -> dict:
    """`{"text", "token_ids", "finish_reason"}` of a completion of `prompt` (text, or token
    ids, to which the tokenizer's BOS is added where it adds one) from the newest checkpoint in `workdir`; `token_ids` are the new ones
    (with the EOS that stopped it, which `text` leaves out)."""
    from infra.data.tokenizer import load_tokenizer
    from infra.run import load_config, require_checkpoint
    from infra.serve.engine import SamplingParams
    from infra.serve.scheduler import Request, Scheduler

    _check_arguments(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, seed=seed)
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")
    workdir = paths.path(workdir)
    config = load_config(workdir)
    require_checkpoint(workdir)  # before building anything: the common mistake
    tok = load_tokenizer(config.data.tokenizer)
    started = time.perf_counter()
    ids = tok.encode_prompt(prompt)  # the tokenizer's convention: BOS (Llama 3) or nothing
    limit = int(config.model.max_seq_len)
    if len(ids) >= limit:
        raise UserError(f"the prompt is {len(ids)} tokens but the model's context is {limit} "
                        f"tokens; shorten --prompt")
    if len(ids) == 0:
        raise UserError("this tokenizer has no BOS token: pass a non-empty --prompt")
    engine = _engine(workdir, config, tok, context_for(len(ids) + max_new_tokens, limit))
    if max_new_tokens == 0:
        return {"text": "", "token_ids": [], "finish_reason": "length"}
    request = Request(ids, SamplingParams(temperature, top_k, top_p, seed),
                      max_tokens=max_new_tokens)
    scheduler = Scheduler(engine, tok)
    scheduler.submit(request)
    scheduler.run_until_idle()
    new = request.token_ids
    stopped = bool(new) and new[-1] == tok.eos_id
    return {"text": request.finished.text, "token_ids": [int(t) for t in new],
            "finish_reason": "eos" if stopped else "length",
            # from the call to the first new token: restore, compile (or the cache), prefill
            "first_token_s": (round(request.first_token_at - started, 4)
                              if request.first_token_at is not None else None),
            "compile_cache": compile_cache.stats()}


def context_for(tokens: int, limit: int) -> int:
    """The KV cache length for a request of `tokens` (prompt + new): the next power of two
    (at least the smallest prefill bucket), at most the model's context `limit`. Each decode
    step reads the whole cache, so a short request on a long-context model (8,192 positions)
    decodes many times faster; powers of two keep the programs compiled (and cached) few."""
    from infra.serve.engine import MIN_BUCKET

    return min(limit, max(MIN_BUCKET, 1 << max(tokens - 1, 1).bit_length()))


def _engine(workdir: PathLike, config, tok, max_len: int):
    """A one-slot engine with a `max_len` cache for this model, tokenizer and device set, its
    parameters restored from `workdir` now. Engines are kept per process (their steps are
    compiled once: repeated calls from a notebook compile nothing); the parameters are read
    anew every call."""
    import jax

    from infra.mesh import serve_mesh
    from infra.serve.engine import Engine
    from infra.serve.loading import allowed_ids, load_model

    key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str),
           json.dumps(config.finetune.to_dict(), sort_keys=True),
           tok.spec,
           tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, tuple(d.id for d in jax.devices()),
           max_len)
    engine = _ENGINES.get(key)
    if engine is None:
        mesh = serve_mesh(config)
        serving, model_def, params, step, rules = load_model(workdir, mesh)
        engine = Engine(model_def, params, serving, mesh=mesh, rules=rules, slots=1,
                        allowed=allowed_ids(tok, int(config.model.vocab_size)), max_len=max_len)
        _ENGINES[key] = engine
    else:
        *_, params, step, _ = load_model(workdir, engine.mesh)
        engine.set_params(params)
    log.info("generating from checkpoint step %d in %s", step, workdir)
    return engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="workdir of a trained language model")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="at most this many new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=40, help="sample among the k likeliest; 0 = all")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="sample among the likeliest ids whose probability reaches p; 1 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text (the completion), token_ids, finish_reason, "
                        "first_token_s, compile_cache (programs loaded from / written to it)")
    p.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_cli(args) -> int:
    out = complete(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                   top_p=args.top_p)
    print(jsonout.dumps(out, ensure_ascii=False) if args.json else args.prompt + out["text"])
    return 0
