"""`python -m infra serve` as users run it: a real server process on a loopback port, called with
the official `openai` client (and raw HTTP for what the client hides).

One smoke model trained for a few steps with a 512-token context (long generations make
disconnects and drains observable); the server runs on 1 CPU device (the 8-device engine is
tests/test_serve_engine.py), 2 slots and a queue of 2.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import cli, popen

SMOKE = "experiments/lm.py:smoke"
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = tmp_path_factory.mktemp("serve") / "run"
    p = cli("train", "--config", SMOKE, "--workdir", str(w), "--config.sharding.print_table=false",
            "--config.train.steps=5", "--config.checkpoint.every=5",
            "--config.model.max_seq_len=512", env={"INFRA_CPU_DEVICES": "1"})
    assert p.returncode == 0, p.stderr
    return w


class Server:
    def __init__(self, workdir, *extra, slots: int = 2, max_queue: int = 2, name: str = "smoke"):
        self.proc = popen("serve", "--workdir", str(workdir), "--port", "0", "--slots",
                          str(slots), "--max_queue", str(max_queue), "--model_name", name,
                          *extra, env={"INFRA_CPU_DEVICES": "1"})
        line = self.proc.stdout.readline()  # printed once warmed up and listening
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.base = f"http://127.0.0.1:{match.group(1)}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="none", max_retries=0,
                                    timeout=60)

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return r.status, r.read().decode()

    def post(self, path, data: bytes):
        req = urllib.request.Request(self.base + path, data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def metric(self, name):
        text = self.get("/metrics")[1]
        values = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        return sum(values)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def server(workdir):
    s = Server(workdir)
    yield s
    out, err = s.stop()
    assert s.proc.returncode == 0, err[-3000:]


@pytest.mark.slow
def test_completions_and_chat_with_the_openai_client(server):
    from infra.data.tokenizer import ByteTokenizer

    c = server.client
    assert server.get("/health") == (200, '{"status":"ok"}')
    assert [m.id for m in c.models.list().data] == ["smoke"]
    prompt = "def main():"
    r = c.completions.create(model="smoke", prompt=prompt, max_tokens=12, temperature=0)
    prompt_tokens = 1 + len(ByteTokenizer().encode(prompt))  # BOS + bytes
    assert r.object == "text_completion" and len(r.choices) == 1
    choice = r.choices[0]
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    # streaming gives the same text, chunk by chunk, then the usage, then [DONE]
    chunks = list(c.completions.create(model="smoke", prompt=prompt, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == choice.finish_reason
    # a seeded sampled request is reproducible; top_p and stop are honoured
    kw = dict(model="smoke", prompt=prompt, max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    assert c.completions.create(**kw).choices[0].text == c.completions.create(**kw).choices[0].text
    full = c.completions.create(model="smoke", prompt=prompt, max_tokens=20, temperature=0)
    text = full.choices[0].text
    if len(text) > 4:
        stopped = c.completions.create(model="smoke", prompt=prompt, max_tokens=20,
                                       temperature=0, stop=[text[3:5]])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[:text.find(text[3:5])]
    # chat, whole and streamed
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "A function, please."}]
    chat = c.chat.completions.create(model="smoke", messages=messages, max_tokens=10,
                                     temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 10 and chat.usage.prompt_tokens > 20
    parts = list(c.chat.completions.create(model="smoke", messages=messages, max_tokens=10,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == \
        chat.choices[0].message.content
    assert parts[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    status, metrics = server.get("/metrics")
    for name in ("infra_serve_time_to_first_token_seconds_bucket",
                 "infra_serve_inter_token_latency_seconds_bucket", "infra_serve_queue_length",
                 "infra_serve_busy_slots", "infra_serve_tokens_per_second"):
        assert name in metrics, name


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    c = server.client
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "smoke", "prompt": "x", "max_tokens": -1}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "smoke", "prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
        (json.dumps({"model": "smoke", "prompt": "x", "n": 17}).encode(), 400, "n"),
        (json.dumps({"model": "smoke", "prompt": ["x"] * 9, "n": 16}).encode(), 400, "n"),
        (json.dumps({"model": "smoke", "prompt": 5}).encode(), 400, "prompt"),
        (json.dumps({"model": "smoke", "prompt": "x" * 600}).encode(), 400, "prompt"),
        (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "model"),
    ]
    for body, status, param in cases:
        got, answer = server.post("/v1/completions", body)
        assert got == status, (body, got, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (body, error)
    got, answer = server.post("/v1/chat/completions", json.dumps({"model": "smoke",
                                                                  "messages": "hi"}).encode())
    assert got == 400 and answer["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="smoke", prompt="x", max_tokens=0)
    assert c.completions.create(model="smoke", prompt="x", max_tokens=3).usage.completion_tokens >= 1
    assert server.get("/health")[0] == 200


@pytest.mark.slow
def test_overload_gets_429_and_a_disconnect_frees_its_slot(server):
    c = server.client

    def long_request(_):
        try:
            r = c.completions.create(model="smoke", prompt="x", max_tokens=300, temperature=0)
            return r.usage.completion_tokens
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.body["code"] == "rate_limit_exceeded"
            return 429

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        results = list(pool.map(long_request, range(7)))
    # 2 slots + 2 queued are taken; the rest were refused at once
    assert results.count(429) >= 2 and sum(r != 429 for r in results) >= 4, results
    # a streaming client that goes away mid-stream: its request is cancelled and the slot freed
    cancelled = server.metric('infra_serve_requests_total{finish_reason="cancelled"}')
    stream = c.completions.create(model="smoke", prompt="x", max_tokens=500, temperature=0,
                                  stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.metric("infra_serve_busy_slots") == 1
    stream.close()
    deadline = time.monotonic() + 5
    while server.metric("infra_serve_busy_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("infra_serve_busy_slots") == 0
    assert server.metric('infra_serve_requests_total{finish_reason="cancelled"}') == cancelled + 1


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits_0(workdir):
    s = Server(workdir)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: s.client.completions.create(
            model="smoke", prompt="x", max_tokens=300, temperature=0))
        deadline = time.monotonic() + 30
        while s.metric("infra_serve_busy_slots") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, answer = s.post("/v1/completions", json.dumps({"prompt": "y"}).encode())
        assert status == 503 and answer["error"]["code"] == "draining"
        result = running.result(timeout=60)
    assert result.usage.completion_tokens == 300 and result.choices[0].finish_reason == "length"
    out, err = s.proc.communicate(timeout=60)
    assert s.proc.returncode == 0, err[-3000:]
    assert "draining 1 request" in err and "drained; exiting" in err


@pytest.mark.slow
def test_the_readme_client_snippet_runs_as_shown(server, capsys):
    """The README's `openai` example, run against a real server: text, then the usage; no stray
    `None` from the final chunk's empty delta."""
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    snippet = next(block for block in readme.split("```python\n")[1:]
                   if "from openai import OpenAI" in block).split("```")[0]
    snippet = snippet.replace("http://127.0.0.1:8000/v1", server.base + "/v1")
    exec(compile(snippet.replace('model="tiny"', 'model="smoke"'), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "None" not in out and out.count(" tokens]") == 2, out
