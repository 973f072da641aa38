"""Hostile input to `python -m infra serve`: a real server process on a loopback port, called over
real sockets (raw HTTP for what the `openai` client would never send), plus the template sandbox
and the server's error handler in-process.

The served model is what a user downloads: a tiny Llama in a Hugging Face directory whose
`tokenizer_config.json` carries a chat template that loops for hours, builds a string of 10 GB,
or recurses without end when the first message asks it to (and renders normally otherwise),
imported with `hf import`. The server requires an API key (from the environment), accepts bodies
up to 1 MB, and gives a template 2 s.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
import types

import pytest

from tests.helpers import cli, popen

openai = pytest.importorskip("openai")

KEY = "sekrit-key"
TEMPLATE_TIMEOUT = 2.0
LOOP = "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}"
HOSTILE = (
    "{%- if messages[0].content == 'loop' -%}"
    "{%- for i in range(10**5) -%}{%- for j in range(10**5) -%}{%- endfor -%}{%- endfor -%}"
    "{%- elif messages[0].content == 'big' -%}{{ 'x' * 10**10 }}"
    "{%- elif messages[0].content == 'deep' -%}"
    "{%- macro f(n) -%}{{ f(n + 1) }}{%- endmacro -%}{{ f(0) }}"
    "{%- endif -%}"
    "{{ bos_token }}{%- for m in messages -%}<{{ m.role }}>{{ m.content }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<assistant>{%- endif -%}"
)


def hf_dir_with_template(directory, template: str):
    """A tiny randomised Llama saved as transformers saves it, with our tokenizer and `template`
    in its tokenizer_config.json."""
    from tests import hf_models

    tok = hf_models.train_tokenizer(directory.parent / f"{directory.name}-tok")
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    return hf_models.save(hf_models.build("llama"), directory, tok)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    hf = hf_dir_with_template(base / "hf", HOSTILE)
    w = base / "run"
    p = cli("hf", "import", str(hf), "--workdir", str(w), env={"INFRA_CPU_DEVICES": "1"})
    assert p.returncode == 0, p.stderr
    return w


class Server:
    def __init__(self, workdir, *extra: str):
        self.proc = popen("serve", "--workdir", str(workdir), "--port", "0", "--slots", "2",
                          "--model_name", "tiny", "--max_body_mb", "1",
                          "--template_timeout", str(TEMPLATE_TIMEOUT), *extra,
                          env={"INFRA_CPU_DEVICES": "1", "INFRA_SERVE_API_KEY": KEY})
        self.banner = line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        self.port = int(match.group(1))
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY,
                                    max_retries=0, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, *,
                headers: dict | None = None, key: str | None = KEY, chunked: bool = False,
                timeout: float = 30) -> tuple[int, dict | str, float]:
        """(status, JSON body or text, seconds) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        start = time.perf_counter()
        try:
            if chunked:
                conn.putrequest(method, path)
                for k, v in {**hdrs, "Transfer-Encoding": "chunked"}.items():
                    conn.putheader(k, v)
                conn.endheaders()
                for i in range(0, len(body), 1 << 16):
                    piece = body[i:i + 1 << 16]
                    conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            raw = r.read().decode()
        finally:
            conn.close()
        seconds = time.perf_counter() - start
        try:
            return r.status, json.loads(raw), seconds
        except ValueError:
            return r.status, raw, seconds

    def post(self, path: str, obj, **kw):
        return self.request("POST", path, json.dumps(obj).encode(), **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def server(workdir):
    """The imported model served with int8 projection weights and an int8 KV cache (the CLI's
    low-precision switches; what hostile input meets does not depend on them)."""
    s = Server(workdir, "--quantize", "int8", "--kv_cache", "int8")
    yield s
    out, err = s.stop()
    assert s.proc.returncode == 0, err[-3000:]


def openai_error(status, body, expected_status, code=None):
    """The response is OpenAI's error shape with `expected_status` (and `code`)."""
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]["message"]


def chat_body(content: str) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}],
            "max_tokens": 4, "temperature": 0}


@pytest.mark.slow
def test_a_hostile_template_fails_its_request_and_nothing_else(server):
    """While a template loops, /health and a completion answer within 2 s; the looping request
    gets a 400 within the template timeout (+ slack); so do a 10 GB string and endless
    recursion; then ordinary chats work (their renderers were replaced)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        loop=server.post("/v1/chat/completions", chat_body("loop"))))
    thread.start()
    time.sleep(0.5)  # the template is spinning now
    status, body, seconds = server.request("GET", "/health", key=None)
    assert (status, body) == (200, {"status": "ok"}) and seconds < 2, (status, body, seconds)
    status, body, seconds = server.post("/v1/completions", {"model": "tiny", "prompt": "hello",
                                                            "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert seconds < 2, seconds
    thread.join(30)
    status, body, seconds = result["loop"]
    message = openai_error(status, body, 400)
    assert f"did not finish rendering within {TEMPLATE_TIMEOUT:g} s" in message, message
    assert seconds < TEMPLATE_TIMEOUT + 3, seconds
    for content, expected in (("big", "out of memory"), ("deep", "recurses too deeply")):
        status, body, seconds = server.post("/v1/chat/completions", chat_body(content))
        assert expected in openai_error(status, body, 400), body
        assert seconds < TEMPLATE_TIMEOUT + 3, seconds
    reply = server.client.chat.completions.create(model="tiny", max_tokens=4, temperature=0,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 3


@pytest.mark.slow
def test_hostile_bodies_get_openai_shaped_4xx(server):
    surrogate = b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}'
    status, body, _ = server.request("POST", "/v1/completions", surrogate)
    assert "surrogate" in openai_error(status, body, 400)
    chat = (b'{"model": "tiny", "max_tokens": 2, "messages": '
            b'[{"role": "user", "content": "x\\udfffy"}]}')
    status, body, _ = server.request("POST", "/v1/chat/completions", chat)
    assert "'messages'" in openai_error(status, body, 400)
    status, body, _ = server.request("POST", "/v1/completions", b"[" * 100_000)
    assert "nests too deeply" in openai_error(status, body, 400)
    status, body, _ = server.request("POST", "/v1/completions", b"\xff\xfe{not json")
    assert "not valid JSON" in openai_error(status, body, 400)
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 * 2**20)}).encode()
    status, body, _ = server.request("POST", "/v1/completions", big)
    assert "larger than 1,048,576 bytes" in openai_error(status, body, 413)
    status, body, _ = server.request("POST", "/v1/completions", big, chunked=True)
    openai_error(status, body, 413)
    # a prompt no context can hold is refused by its length, without tokenizing it
    status, body, seconds = server.post("/v1/completions", {"model": "tiny",
                                                            "prompt": "ab " * 300_000})
    openai_error(status, body, 400, code="context_length_exceeded")
    assert seconds < 2, seconds
    status, body, _ = server.post("/v1/completions", {"model": "tiny", "prompt": "a",
                                                      "stop": "s" * 1000})
    assert "'stop'" in openai_error(status, body, 400)
    status, body, _ = server.request("GET", "/health", key=None)
    assert status == 200


@pytest.mark.slow
def test_the_api_key_is_required_on_v1_only(server):
    for key in (None, "wrong"):
        status, body, _ = server.post("/v1/completions", {"prompt": "a"}, key=key)
        openai_error(status, body, 401, code="invalid_api_key")
        status, body, _ = server.request("GET", "/v1/models", key=key)
        openai_error(status, body, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.client.base_url, api_key="wrong",
                      max_retries=0).models.list()
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert "int8 weights, int8 KV cache, API key required" in server.banner, server.banner
    assert server.request("GET", "/health", key=None)[0] == 200
    assert server.request("GET", "/metrics", key=None)[0] == 200


@pytest.mark.slow
def test_port_in_use_and_unparsable_template_fail_before_loading(workdir, tmp_path):
    """Both are found before the checkpoint is even read: with the checkpoints gone, the error
    is still about the port, or the template."""
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(workdir, broken, ignore=shutil.ignore_patterns("checkpoints"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = cli("serve", "--workdir", str(broken), "--port", str(port), timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; pick another --port "
        "(0 = any free one)"], p.stderr
    run_config = json.loads((broken / "config.json").read_text())
    run_config["data"]["tokenizer"] = str(broken / "tokenizer")  # the copy's own
    (broken / "config.json").write_text(json.dumps(run_config))
    config = broken / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "chat_template": "{% for m in messages %}{{ m.content }"}))
    p = cli("serve", "--workdir", str(broken), "--port", "0", timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: the chat template does not parse"), lines


# --------------------------------------------------------------------------- in-process


def test_template_sandbox_bounds_time_memory_recursion_and_output():
    from infra.data import chat
    from infra.data.template_sandbox import TemplateBusy, TemplateSandbox, TemplateTimeout

    sandbox = TemplateSandbox(1, timeout_s=1.0, max_chars=10_000, wait_s=0.2).start()
    messages = [{"role": "user", "content": "hi"}]
    render = lambda source: sandbox.render(source, messages, special={},  # noqa: E731
                                           add_generation_prompt=False)
    try:
        start = time.perf_counter()
        with pytest.raises(TemplateTimeout, match="within 1 s"):
            render(LOOP)
        assert time.perf_counter() - start < 3
        with pytest.raises(chat.TemplateRejected, match="out of memory"):
            render("{{ 'x' * 10**10 }}")
        with pytest.raises(chat.TemplateRejected, match="recurses too deeply"):
            render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}")
        with pytest.raises(chat.TemplateRejected, match="more than 10000 characters"):
            render("{% for i in range(1000) %}{{ 'y' * 100 }}{% endfor %}")
        # the one worker is spinning: a second render waits for it at most wait_s
        errors = []

        def spin():
            try:
                render(LOOP)
            except TemplateTimeout as e:
                errors.append(e)

        spinning = threading.Thread(target=spin)
        spinning.start()
        time.sleep(0.3)
        with pytest.raises(TemplateBusy, match="busy"):
            render("{{ messages[0].content }}")
        spinning.join()
        assert len(errors) == 1
        assert render("{{ messages[0].content }}") == ("hi", [])  # a fresh worker took over
    finally:
        sandbox.close()


def test_an_unexpected_error_is_a_500_in_openai_shape_and_the_server_goes_on():
    from starlette.testclient import TestClient

    from infra.data.tokenizer import ByteTokenizer
    from infra.data.template_sandbox import TemplateSandbox
    from infra.serve.prometheus import PrometheusMetrics
    from infra.serve.routes import create_app
    from infra.serve.server import Api

    scheduler = types.SimpleNamespace(engine=types.SimpleNamespace(max_len=64), error=None)
    api = Api(scheduler, ByteTokenizer(), "m", PrometheusMetrics(), sandbox=TemplateSandbox(1))

    async def broken(body, *, chat_api):
        raise ZeroDivisionError("a bug")

    api.parse = broken
    client = TestClient(create_app(api), raise_server_exceptions=False)
    r = client.post("/v1/completions", json={"prompt": "a"})
    message = openai_error(r.status_code, r.json(), 500)
    assert "ZeroDivisionError" in message and r.json()["error"]["type"] == "server_error"
    assert client.get("/health").json() == {"status": "ok"}
    api.sandbox.close()
