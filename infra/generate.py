"""`python -m infra generate --workdir runs/x --prompt "def "`: sample text from a trained LM.

Rebuilds the model from `<workdir>/config.json` (the resolved config the run saved), restores only
the parameters of the newest intact checkpoint (`infra.checkpoint.restore_params`: checksums
verified, nothing in the workdir changed), and samples autoregressively in one jitted loop:
the context lives in a fixed buffer (`[BOS] + prompt`, padded; as long as prompt and new tokens
need, rounded up to 64, at most `model.max_seq_len`), and each step runs the model on the whole
buffer and reads the logits at the current position (no KV cache: simple, and exact because
attention is causal). Temperature scaling and top-k filtering; temperature 0 is greedy. Text is
encoded and decoded with the run's tokenizer (`data.tokenizer`: bytes by default), which also
gives BOS and EOS; only ids of the tokenizer that are not BOS / PAD can be sampled. Stops at EOS,
after `max_new_tokens`, or when the buffer is full. `--json` prints one JSON object per run.

JAX is imported inside the functions: the CLI applies `--cpu_devices` before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from infra.errors import UserError

log = logging.getLogger(__name__)
_SAMPLERS: dict = {}  # (model config, mesh) -> jitted sampler


def load_config(workdir: str | Path):
    """The resolved config of a language-model run in `workdir`."""
    from infra import config as config_lib

    raw = config_lib.read_saved(workdir)
    if raw.get("task") not in ("lm", "sft"):
        raise UserError(f"generate needs a language-model run (task 'lm' or 'sft'); "
                        f"{Path(workdir) / config_lib.CONFIG_FILE} has task {raw.get('task')!r}")
    return config_lib.load_saved(workdir, raw)


def _mesh(config):
    """Parameters sharded FSDP-style over every local device (tensor-parallel as trained where
    the device count allows): batch 1 needs no data parallelism. Checkpoints restore onto any
    mesh."""
    import jax
    from ml_collections import ConfigDict

    from infra import mesh as mesh_lib

    n = len(jax.devices())
    tensor = int(config.mesh.tensor)
    tensor = tensor if tensor > 0 and n % tensor == 0 else 1
    sizes = {a: 1 for a in mesh_lib.AXES} | {f"dcn_{a}": 1 for a in mesh_lib.AXES}
    sizes |= {"fsdp": -1, "tensor": tensor}
    return mesh_lib.make_mesh(ConfigDict(sizes))


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


def make_sampler(model_def, max_seq_len: int):
    """A jitted `(params, buffer, start, max_new, temperature, top_k, key, allowed, eos) ->
    (buffer, end)`.

    `buffer` is `(1, max_seq_len)` int32 holding `[BOS] + prompt` in `[0, start)`; tokens are
    written at `start, start + 1, …` until `eos` (written too), `max_new` tokens, or the buffer's
    end; `end` is one past the last token written. `allowed` (vocab,) bool: the ids that may
    be sampled.
    """
    import jax
    import jax.numpy as jnp

    def sample(params, buffer, start, max_new, temperature, top_k, key, allowed, eos):
        model = model_def.merge(params)
        stop = jnp.minimum(start + max_new, max_seq_len)

        def cond(carry):
            _, pos, done, _ = carry
            return (pos < stop) & ~done

        def body(carry):
            buf, pos, _, key = carry
            logits = model(buf)[0, pos - 1].astype(jnp.float32)
            logits = jnp.where(allowed, logits, -jnp.inf)
            greedy = jnp.argmax(logits)
            # top-k: keep logits at least as large as the k-th largest (k <= 0: keep all).
            k = jnp.clip(top_k, 1, model.vocab_size)
            kth = jnp.sort(logits)[::-1][k - 1]
            filtered = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
            key, sub = jax.random.split(key)
            sampled = jax.random.categorical(sub, filtered / jnp.maximum(temperature, 1e-6))
            token = jnp.where(temperature > 0, sampled, greedy).astype(buf.dtype)
            buf = buf.at[0, pos].set(token)
            return buf, pos + 1, token == eos, key

        buf, end, _, _ = jax.lax.while_loop(cond, body, (buffer, start, jnp.array(False), key))
        return buf, end

    return jax.jit(sample)


def generate(workdir: str | Path, prompt: str, *, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    """Prompt + completion sampled from the newest checkpoint in `workdir`."""
    return prompt + complete(workdir, prompt, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, seed=seed)["text"]


def complete(workdir: str | Path, prompt: str | list[int], *, max_new_tokens: int = 200,
             temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> dict:
    """`{"text", "token_ids", "finish_reason"}` of a completion of `prompt` (text, or token
    ids that follow BOS) from the newest checkpoint in `workdir`; `token_ids` are the new ones
    (with the EOS that stopped it, which `text` leaves out)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from infra import sharding
    from infra.checkpoint import committed_steps, restore_params
    from infra.state import shard_state
    from infra.tasks import get_task, logical_rules

    _check_arguments(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, seed=seed)
    workdir = Path(workdir)
    config = load_config(workdir)
    if not committed_steps(workdir):  # before building anything: the common mistake
        raise UserError(f"no checkpoint in '{workdir / 'checkpoints'}'; train first "
                        f"(python -m infra train --config ... --workdir {workdir})")
    from infra.data.tokenizer import load_tokenizer

    tok = load_tokenizer(config.data.tokenizer)
    body = tok.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt, np.int32)
    ids = np.concatenate([[tok.bos_id] if tok.bos_id is not None else [], body]).astype(np.int32)
    limit = int(config.model.max_seq_len)
    if len(ids) >= limit:
        raise UserError(f"the prompt is {len(ids)} tokens but the model's context is {limit} "
                        f"tokens; shorten --prompt")
    if len(ids) == 0:
        raise UserError("this tokenizer has no BOS token: pass a non-empty --prompt")
    length = min(limit, -(-(len(ids) + max_new_tokens) // 64) * 64)  # fewer shapes to compile

    mesh = _mesh(config)
    rules = sharding.normalize_rules(logical_rules(config), mesh)
    task = get_task(config)
    sharded = shard_state(task.build_model, optax.identity(), mesh, rules)  # params only
    params, step = restore_params(workdir, sharded.abstract["params"])
    log.info("generating from checkpoint step %d in %s", step, workdir)

    pad = tok.pad_id if tok.pad_id is not None else 0
    buffer = np.full((1, length), pad, np.int32)
    buffer[0, : len(ids)] = ids
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # One compiled sampler per model and mesh in this process (the prompt, lengths, temperature,
    # top-k and seed are traced arguments): repeated calls from a notebook compile once.
    key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str),
           json.dumps(config.finetune.to_dict() if "finetune" in config else {}, sort_keys=True),
           length,
           tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat))
    if key not in _SAMPLERS:
        _SAMPLERS[key] = make_sampler(sharded.model, length)
    sampler = _SAMPLERS[key]
    # Never BOS, PAD or the vocabulary's padding beyond the tokenizer.
    allowed = np.arange(config.model.vocab_size) < tok.vocab_size
    for special in (tok.bos_id, tok.pad_id):
        if special is not None and special != tok.eos_id:
            allowed[special] = False
    eos = tok.eos_id if tok.eos_id is not None else -1
    buf, end = sampler(
        params, jax.device_put(buffer, replicated), jnp.int32(len(ids)),
        jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.int32(top_k),
        jax.random.key(seed), jax.device_put(allowed, replicated), jnp.int32(eos),
    )
    new = np.asarray(jax.device_get(buf))[0, len(ids): int(end)]
    stopped = len(new) > 0 and int(new[-1]) == eos
    text = tok.decode(new[:-1] if stopped else new)
    return {"text": text, "token_ids": [int(t) for t in new],
            "finish_reason": "eos" if stopped else "length"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="workdir of a trained language model")
    p.add_argument("--prompt", default="", help="text to continue (default: empty)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="at most this many new tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=40, help="sample among the k likeliest; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text (the completion), token_ids, finish_reason")
    p.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def run_cli(args) -> int:
    out = complete(args.workdir, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(json.dumps(out, ensure_ascii=False) if args.json else args.prompt + out["text"])
    return 0
