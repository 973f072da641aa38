"""Supervised fine-tuning in process: loss masks, packing, chat templates, LoRA, the data."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from infra import config, train
from infra.data import chat, docstrings, sft
from infra.errors import ConfigError, DataError
from infra.models import lora
from infra.tasks import get_task

SMOKE = "experiments/sft.py:smoke"


def build(overrides=None, seed=0):
    """(task, graphdef, params) of the smoke SFT model, built eagerly without a mesh."""
    task = get_task(config.load(SMOKE, overrides or {}))
    with nnx.use_eager_sharding(False):
        model = task.build_model(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    return task, graphdef, params


def loss_and_grads(task, graphdef, params, batch):
    def f(p):
        return task.loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0))[0]

    return jax.jit(jax.value_and_grad(f))(params)


def random_batch(seed=0, rows=4, length=32, vocab=259):
    r = np.random.default_rng(seed)
    mask = (r.random((rows, length)) < 0.4).astype(np.float32)
    mask[:, 0] = 1.0
    return {"inputs": r.integers(0, vocab, (rows, length), dtype=np.int32),
            "targets": r.integers(0, vocab, (rows, length), dtype=np.int32),
            "loss_mask": mask, "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1))}


# --------------------------------------------------------------------------- loss mask


def test_masked_tokens_contribute_exactly_zero_and_loss_is_normalised_by_learnt_tokens():
    task, graphdef, params = build()
    batch = random_batch()
    loss, grads = loss_and_grads(task, graphdef, params, batch)
    # any target outside the completion: the same loss and bit-identical gradients
    other = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"],
                                         (batch["targets"] + 7) % 259).astype(np.int32))
    loss2, grads2 = loss_and_grads(task, graphdef, params, other)
    assert float(loss2) == float(loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_array_equal(a, b)
    # the gradient of the loss with respect to a masked token's logits is exactly zero
    model = nnx.merge(graphdef, params)
    logits = np.asarray(model(batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"]), np.float64)

    def from_logits(z):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(z), batch["targets"][..., None], -1)[..., 0]
        m = batch["loss_mask"]
        return jnp.sum(jnp.where(m > 0, nll, 0.0) * m) / jnp.sum(m)

    g = np.asarray(jax.grad(from_logits)(jnp.asarray(logits, jnp.float32)))
    assert np.all(g[batch["loss_mask"] == 0] == 0.0)
    assert np.all(np.abs(g[batch["loss_mask"] == 1]).sum(-1) > 0)
    # by hand: sum of the learnt tokens' nll over the count of learnt tokens
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    hand = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert float(loss) == pytest.approx(hand, rel=1e-6)


# --------------------------------------------------------------------------- packing


def example_rows(packing, seq_len=48, seed=3):
    r = np.random.default_rng(seed)
    encoded = []
    for n in (9, 30, 14, 21, 6, 17, 40, 11):
        tokens = r.integers(0, 256, n).astype(np.int32)
        learnt = np.zeros(n, bool)
        learnt[r.integers(1, n - 1):] = True
        encoded.append((tokens, learnt))
    examples, stats = sft.fit(encoded, seq_len, "truncate")
    rows = sft.make_rows(examples, stats, seq_len=seq_len, packing=packing, seed=0, pad_id=256)
    return rows, stats


@pytest.mark.parametrize("overrides", [{}, {"model.scan_layers": True, "model.causal_blocks": 1}])
def test_packed_batch_equals_the_same_examples_unpacked(overrides):
    task, graphdef, params = build(overrides)
    packed, stats = example_rows(True)
    unpacked, _ = example_rows(False)
    assert len(packed) < len(unpacked) == 8
    assert stats.padding < stats.padding_unpacked
    pb = packed.rows(np.arange(len(packed)))
    ub = unpacked.rows(np.arange(len(unpacked)))
    assert pb["loss_mask"].sum() == ub["loss_mask"].sum()
    assert (pb["segment_ids"].max(axis=1) > 1).any()  # some row really holds several examples
    lp, gp = loss_and_grads(task, graphdef, params, pb)
    lu, gu = loss_and_grads(task, graphdef, params, ub)
    assert abs(float(lp) - float(lu)) <= 1e-5 * abs(float(lu))
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_attention_across_a_segment_boundary_is_exactly_zero():
    task, graphdef, params = build()
    model = nnx.merge(graphdef, params)
    rows, _ = example_rows(True)
    batch = rows.rows(np.arange(len(rows)))
    row = int(np.argmax(batch["segment_ids"].max(axis=1)))
    seg = batch["segment_ids"][row]
    run = lambda b: np.asarray(model(b["inputs"], positions=b["positions"],  # noqa: E731
                                     segment_ids=b["segment_ids"]))
    base = run(batch)
    for s in range(1, seg.max() + 1):
        changed = {k: v.copy() for k, v in batch.items()}
        changed["inputs"][row, seg == s] = (changed["inputs"][row, seg == s] + 1) % 256
        out = run(changed)
        others = seg != s
        np.testing.assert_array_equal(out[row, others], base[row, others])  # bit for bit
        assert not np.array_equal(out[row, seg == s], base[row, seg == s])


def test_best_fit_packing_places_every_example_once_deterministically():
    lengths = np.random.default_rng(0).integers(1, 100, 500)
    order = np.random.default_rng(1).permutation(500)
    rows = sft.pack(lengths, 128, order)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(lengths[r].sum() <= 128 for r in rows)
    assert rows == sft.pack(lengths, 128, order)
    assert len(rows) <= int(np.ceil(lengths.sum() / 128 * 1.1))  # within 10% of perfect


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    ex = lambda n, start: (np.arange(n, dtype=np.int32), np.arange(n) >= start)  # noqa: E731
    encoded = [ex(10, 5), ex(40, 3), ex(40, 30), ex(5, 5)]
    kept, stats = sft.fit(encoded, 16, "truncate")
    assert (stats.kept, stats.truncated, stats.dropped_empty) == (2, 1, 2)
    assert list(kept.lengths) == [9, 16]
    kept, stats = sft.fit(encoded, 16, "drop")
    assert (stats.kept, stats.dropped_overlong, stats.dropped_empty) == (1, 2, 1)


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion"\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        sft.read_jsonl([str(f)])
    f.write_text('{"text": "no"}\n')
    with pytest.raises(DataError, match=r'd.jsonl:1: expected an object with "messages"'):
        sft.read_jsonl([str(f)])


def test_prompt_completion_learns_the_completion_and_eos():
    from infra.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    [(ids, learnt)] = sft.encode([("f", 1, {"prompt": "ab", "completion": "cd"})], tok)
    assert list(ids) == [tok.bos_id, 97, 98, 99, 100, tok.eos_id]
    assert list(learnt) == [False, False, False, True, True, True]


# --------------------------------------------------------------------------- chat templates

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ALTERNATING = (  # Llama-2 style: no generation tags, refuses roles out of order
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + "
    "eos_token }}{% endif %}{% endfor %}")
MESSAGES = [{"role": "user", "content": "What does len() return? é"},
            {"role": "assistant", "content": "The number of items.\nFor a str, characters."},
            {"role": "user", "content": "And for bytes?"},
            {"role": "assistant", "content": "The number of bytes."}]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    from tests import hf_models

    return hf_models.train_tokenizer(tmp_path_factory.mktemp("bpe"))


def with_template(directory, template, tmp_path):
    import shutil

    out = tmp_path / "tok"
    shutil.copytree(directory, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return out


@pytest.mark.parametrize("name", ["builtin", "chatml", "alternating"])
def test_rendered_ids_equal_transformers_apply_chat_template(bpe_dir, tmp_path, name):
    from transformers import AutoTokenizer

    from infra.data.tokenizer import HFTokenizer

    template = {"builtin": chat.BUILTIN_TEMPLATE, "chatml": CHATML, "alternating": ALTERNATING}[name]
    directory = with_template(bpe_dir, template, tmp_path)
    ours = chat.ChatEncoder(HFTokenizer(directory))
    assert ours.source == template  # read from tokenizer_config.json
    [(ids, mask)] = ours.encode([MESSAGES])
    theirs = AutoTokenizer.from_pretrained(str(directory))
    if name == "alternating":  # no {% generation %}: ids only, spans found by prefixes
        expected = theirs.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)
    else:
        expected = theirs.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
        assert list(mask.astype(int)) == list(expected["assistant_masks"])
    assert list(ids) == list(expected["input_ids"])
    learnt = theirs.decode([int(i) for i in ids[mask]])
    assert "The number of items." in learnt and "The number of bytes." in learnt
    assert "len()" not in learnt and "And for bytes" not in learnt
    if name != "chatml":  # the assistant turns end with EOS, which is learnt
        assert int(ids[mask][-1]) == HFTokenizer(directory).eos_id


def test_a_role_the_template_rejects_is_one_clear_error(bpe_dir, tmp_path):
    from infra.data.tokenizer import ByteTokenizer, HFTokenizer

    with pytest.raises(chat.TemplateRejected, match="role 'tool' is not one of system, user"):
        chat.ChatEncoder(ByteTokenizer()).encode([[{"role": "tool", "content": "x"}]])
    tok = HFTokenizer(with_template(bpe_dir, ALTERNATING, tmp_path))
    with pytest.raises(chat.TemplateRejected, match="roles must alternate"):
        chat.ChatEncoder(tok).encode([MESSAGES[1:]])


# --------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("scan", [False, True])
def test_lora_model_equals_base_at_step_zero(scan):
    overrides = {"model.scan_layers": scan}
    task, graphdef, params = build(overrides)
    ltask, lgraph, lparams = build({**overrides, "finetune.lora.rank": 4,
                                    "finetune.lora.targets": "attn/(q|k|v|o)|mlp/(gate|up|down)"})
    base, adapters = lora.split(nnx.to_pure_dict(lparams))
    assert len(lora.adapter_items(adapters)) == (7 if scan else 14)
    nnx.replace_by_pure_dict(lparams, lora.join(nnx.to_pure_dict(params), adapters))
    batch = random_batch()
    run = lambda g, p: np.asarray(nnx.merge(g, p)(batch["inputs"]))  # noqa: E731
    np.testing.assert_array_equal(run(lgraph, lparams), run(graphdef, params))


def test_lora_adapters_are_the_same_in_both_layer_layouts():
    lo = {"finetune.lora.rank": 4}
    _, _, loop = build(lo)
    _, _, scan = build({**lo, "model.scan_layers": True})
    loop, scan = nnx.to_pure_dict(loop), nnx.to_pure_dict(scan)
    for i in range(2):
        np.testing.assert_array_equal(loop["blocks"][i]["attn"]["q_lora"]["a"],
                                      scan["blocks"]["attn"]["q_lora"]["a"][i])


def test_lora_trains_only_the_adapters_and_the_base_stays_bitwise():
    cfg = config.load(SMOKE, {"finetune.lora.rank": 4, "optim.warmup_steps": 0})
    trainer = train.build(cfg)
    state = trainer.state.init(jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    batch = trainer.to_global({**random_batch(rows=16, length=128),
                               "mask": np.ones(16, np.float32)})
    base_arrays = jax.tree.leaves(lora.split(state["params"])[0])
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
    # the frozen base is not donated: the same arrays all along, which a save need not copy
    assert all(a is b and not a.is_deleted()
               for a, b in zip(base_arrays, jax.tree.leaves(lora.split(state["params"])[0])))
    from infra.checkpoint.manager import _copy_on_device

    copy = _copy_on_device(state, trainer.frozen_params)
    (cb, ca), (sb, sa) = lora.split(copy["params"]), lora.split(state["params"])
    assert all(a is b for a, b in zip(jax.tree.leaves(cb), jax.tree.leaves(sb)))
    assert not any(a is b for a, b in zip(jax.tree.leaves(ca), jax.tree.leaves(sa)))
    after = jax.tree.map(np.asarray, state["params"])
    (b0, a0), (b1, a1) = lora.split(before), lora.split(after)
    for x, y in zip(jax.tree.leaves(b0), jax.tree.leaves(b1)):
        np.testing.assert_array_equal(x, y)
    moved = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a0), jax.tree.leaves(a1))]
    assert all(moved)
    # optimizer state: only the adapters' moments
    opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
    assert sum(x.size for x in opt_leaves) == 2 * sum(x.size for x in jax.tree.leaves(a1))


def opt_state_bytes(overrides):
    trainer = train.build(config.load("experiments/sft.py:docstrings", overrides))
    abstract = trainer.state.abstract
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    return nbytes(abstract["opt_state"]), nbytes(abstract["params"])


def test_lora_optimizer_state_scales_with_the_adapters_not_the_model():
    full, params = opt_state_bytes({})
    r8, params8 = opt_state_bytes({"finetune.lora.rank": 8})
    r4, _ = opt_state_bytes({"finetune.lora.rank": 4})
    adapters = params8 - params
    print(f"optimizer state: full {full} B, LoRA r8 attn/(q|k|v|o) {r8} B "
          f"({r8 / full:.2%}), r4 {r4} B; adapters {adapters} B of {params8} B")
    assert r8 <= 0.05 * full  # the issue's target
    assert abs(r8 - 2 * adapters) <= 64  # Adam's two moments of the adapters (+ a step count)
    assert abs(r8 - 2 * r4) <= 64  # linear in the rank


def test_lora_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match=r"finetune.lora.rank must be a positive integer"):
        config.load(SMOKE, {"finetune.lora.rank": 0})
    with pytest.raises(ConfigError, match=r"matches no adaptable parameter; adaptable: "
                                          r"blocks/<i>/attn/k"):
        build({"finetune.lora.rank": 4, "finetune.lora.targets": "attn/qq"})
    with pytest.raises(ConfigError, match="not a valid regex"):
        config.load(SMOKE, {"finetune.lora.rank": 4, "finetune.lora.targets": "attn/(q"})
    with pytest.raises(ConfigError, match="needs a transformer language model"):
        config.load("experiments/vit.py:smoke", {"finetune.lora.rank": 4})


# --------------------------------------------------------------------------- the data set


def test_stdlib_docstrings_are_held_out_by_module_deterministically(tmp_path):
    train_path, val_path = docstrings.build(tmp_path / "a", val_fraction=0.1)
    again, _ = docstrings.build(tmp_path / "b", val_fraction=0.1)
    assert train_path.read_bytes() == again.read_bytes()
    functions = [f for m, p in docstrings.package_files() for f in docstrings.functions(m, p)]
    module_of = {}  # an example found in several modules is kept once, from the first
    for f in functions:
        e = docstrings.example(f, "completion")
        module_of.setdefault((e["prompt"], e["completion"]), f["module"])
    split = {}
    for name, path in (("train", train_path), ("val", val_path)):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            assert record["completion"] not in record["prompt"]
            split.setdefault(name, set()).add(module_of[record["prompt"], record["completion"]])
    assert not split["train"] & split["val"]
    n_train = len(train_path.read_text().splitlines())
    n_val = len(val_path.read_text().splitlines())
    assert 0.07 <= n_val / (n_train + n_val) <= 0.1


def test_adapters_are_sharded_by_the_logical_axis_rules():
    trainer = train.build(config.load(SMOKE, {"finetune.lora.rank": 4, "sharding.preset": "fsdp_tp",
                                              "finetune.lora.targets": "attn/(q|o)|mlp/down"}))
    sh = trainer.state.shardings
    attn = sh["params"]["blocks"][0]["attn"]
    assert attn["q_lora"]["a"].spec == P("fsdp", None)  # (embed, lora_rank)
    assert attn["q_lora"]["b"].spec == P(None, "tensor", None)  # (lora_rank, heads, head_dim)
    assert attn["o_lora"]["a"].spec == P("tensor", None, None)  # (heads, head_dim, lora_rank)
    assert attn["o_lora"]["b"].spec == P(None, "fsdp")  # (lora_rank, embed)
    mu = sh["opt_state"][1][0].mu["blocks"][0]["attn"]["q_lora"]["a"]
    assert mu.spec == P("fsdp", None)  # the optimizer state like its adapter


def test_gradient_accumulation_normalises_over_the_whole_batch():
    """Microbatches with different numbers of learnt tokens: the update is still the mean over
    every learnt token of the batch (microbatches weighted by their tokens)."""
    batch = random_batch(seed=5, rows=16, length=128)
    batch["loss_mask"][::2, 8:] = 0.0  # microbatch 0 (even rows) learns far fewer tokens
    batch["mask"] = np.ones(16, np.float32)
    out = {}
    for k in (1, 2):
        trainer = train.build(config.load(SMOKE, {"train.microbatches": k,
                                                  "optim.warmup_steps": 0}))
        state = trainer.state.init(jax.random.key(0))
        state, metrics = trainer.train_step(state, trainer.to_global(batch))
        out[k] = float(metrics["loss"]), float(metrics["grad_norm"])
    assert out[2][0] == pytest.approx(out[1][0], rel=1e-6)
    assert out[2][1] == pytest.approx(out[1][1], rel=1e-5)  # the gradient's norm
    # (the parameters after one AdamW step are not compared: its first update is ~lr * sign(g),
    # which a rounding-level difference flips where a gradient is ~0)
