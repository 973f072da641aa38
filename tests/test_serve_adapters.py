"""`serve --adapter NAME=WORKDIR`: several LoRA runs fine-tuned from one base, served by one
process, mixed in one batch; each answers as that run served alone (the engine-level check with
ranks that differ is in tests/test_serve_engine.py)."""

from __future__ import annotations

import concurrent.futures

import jax
import numpy as np
import pytest

from tests.helpers import cli
from tests.test_serve_http import Server

SMOKE = "experiments/lm.py:smoke"
ONE = {"INFRA_CPU_DEVICES": "1"}
pytest.importorskip("openai")


def lora_run(base, workdir, seed: int, cache):
    """A LoRA fine-tune of `base`; runs that share `cache` compile their programs once."""
    p = cli("train", "--config", SMOKE, "--workdir", str(workdir), "--config.init.from",
            str(base), "--config.finetune.lora.rank=4", f"--config.train.seed={seed}",
            "--config.train.steps=4", "--config.checkpoint.every=4", "--config.optim.lr=0.05",
            "--config.optim.warmup_steps=0", "--config.sharding.print_table=false",
            env=ONE | {"INFRA_COMPILE_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-3000:]
    return workdir


def alone(workdir, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The greedy completion of each prompt by `workdir` served by an engine of its own (1
    device), one request at a time (each alone in its batch)."""
    from infra.mesh import serve_mesh
    from infra.run import load_config
    from infra.serve.engine import Engine
    from infra.serve.scheduler import Request, Scheduler

    config = load_config(workdir)
    engine = Engine.from_workdir(workdir, slots=2, mesh=serve_mesh(config, jax.devices()[:1]))
    s = Scheduler(engine, engine.tokenizer)
    completions = []
    for prompt in prompts:
        r = s.submit(Request(np.asarray(prompt, np.int32), max_tokens=max_tokens,
                             ignore_eos=True))
        s.run_until_idle()
        completions.append(r.token_ids)
    return completions


@pytest.mark.slow
def test_two_adapters_and_the_base_served_at_once(llama_dir, tmp_path):
    from infra.interop.importer import import_hf

    base = import_hf(llama_dir, tmp_path / "base")
    runs = {name: lora_run(base, tmp_path / name, seed, tmp_path / "compile-cache")
            for name, seed in (("left", 1), ("right", 2))}
    p = cli("serve", "--workdir", str(base), "--adapter", f"x={base}", "--port", "0", env=ONE)
    assert p.returncode == 2 and "not a LoRA run" in p.stderr, p.stderr[-2000:]
    p = cli("serve", "--workdir", str(base), "--adapter", "nameless", env=ONE)
    assert p.returncode == 2 and "expected NAME=WORKDIR" in p.stderr, p.stderr[-2000:]

    server = Server(base, "--adapter", f"left={runs['left']}", "--adapter",
                    f"right={runs['right']}", slots=4, max_queue=16, name="base")
    try:
        c = server.client
        assert [m.id for m in c.models.list().data] == ["base", "left", "right"]
        rng = np.random.default_rng(0)
        prompts = [[int(t) for t in rng.integers(3, 300, n)] for n in (7, 19, 30)]
        asks = [(model, i) for model in ("base", "left", "right") for i in range(len(prompts))]

        def ask(job):
            model, i = job
            r = c.completions.create(model=model, prompt=prompts[i], max_tokens=10,
                                     temperature=0, logprobs=0, extra_body={"ignore_eos": True})
            assert r.model == model
            return r.choices[0].logprobs.tokens

        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:  # one mixed batch
            got = dict(zip(asks, pool.map(ask, asks)))
    finally:
        out, err = server.stop()
    assert server.proc.returncode == 0, err[-3000:]

    from infra.data.tokenizer import load_tokenizer
    from infra.run import load_config

    tok = load_tokenizer(load_config(base).data.tokenizer)
    for model, workdir in (("base", base), *runs.items()):
        for i, ids in enumerate(alone(workdir, prompts, 10)):
            assert got[model, i] == [tok.token_text(t) for t in ids], (model, i)
    assert got["left", 0] != got["right", 0] or got["left", 1] != got["right", 1]
