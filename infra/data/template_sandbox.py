"""Chat templates rendered in child processes, bounded in time, memory and output.

A chat template is code that arrives with a downloaded checkpoint. Jinja's sandbox
(`infra.data.chat`) keeps it away from Python's internals, but not from looping for hours
(`range(10**5)` inside `range(10**5)`), building a string of many gigabytes, or recursing until
the interpreter gives up; rendered in the server's process it would hold the event loop, and in
a thread it would keep the GIL and a core forever. So templates render here instead: in worker
processes that start with their address space capped (`RLIMIT_AS`), whose answer is awaited
for at most `timeout_s`, after which the worker is killed and replaced. A failure of any kind
(the template refuses the conversation, runs out of time or memory, renders more than
`max_chars`, crashes) is a `TemplateRejected` for that conversation only.

    sandbox = TemplateSandbox(workers=2, timeout_s=2.0)
    sandbox.check(template)  # parses? (Jinja evaluates constants while compiling: here too)
    text, spans = sandbox.render(template, messages, special={...}, add_generation_prompt=True)

The protocol is one JSON line each way over the worker's stdin/stdout. A render that waits
longer than `wait_s` (default `timeout_s`) for a free worker gets `TemplateBusy` (the server
answers 429), so the cost of a burst of hostile requests is bounded too.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from typing import Any

from infra.data.chat_template import TemplateRejected

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_CHARS = 4 * 2**20
START_TIMEOUT_S = 120.0  # a worker's interpreter start-up, on a machine busy compiling
READY = b"ready\n"


class TemplateTimeout(TemplateRejected):
    """The template did not finish rendering in time (its worker was killed)."""


class TemplateBusy(TemplateRejected):
    """Every worker stayed busy for longer than `wait_s`."""


class _Worker:
    """One child process running `serve_forever`."""

    def __init__(self, memory_mb: int, max_chars: int):
        env = {**os.environ, "INFRA_TEMPLATE_MEMORY_MB": str(memory_mb),
               "INFRA_TEMPLATE_MAX_CHARS": str(max_chars), "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infra.data.template_sandbox"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, close_fds=True)
        self._buffer = b""
        if self._read_line(START_TIMEOUT_S) != READY.strip():
            self.kill()
            raise TemplateRejected("the chat template renderer did not start")

    def call(self, request: dict, timeout_s: float) -> dict:
        """Send one request; the reply, or TemplateTimeout after `timeout_s` (worker killed)."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            raise TemplateRejected("the chat template's renderer stopped; retry") from None
        line = self._read_line(timeout_s)
        if line is None:
            raise TemplateTimeout(f"the chat template did not finish rendering within "
                                  f"{timeout_s:g} s")
        return json.loads(line)

    def _read_line(self, timeout_s: float) -> bytes | None:
        """The worker's next line; None (worker killed) after `timeout_s`. TemplateRejected
        if the worker died (out of memory, a crash)."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.kill()
                raise TemplateRejected("the chat template crashed its renderer (out of memory "
                                       "or too deep a recursion)")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class TemplateSandbox:
    """A pool of `workers` renderer processes (see the module docstring). Thread-safe."""

    def __init__(self, workers: int = 1, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB, max_chars: int = DEFAULT_MAX_CHARS,
                 wait_s: float | None = None):
        self.timeout_s, self.memory_mb, self.max_chars = timeout_s, memory_mb, max_chars
        self.wait_s = timeout_s if wait_s is None else wait_s  # for a free worker
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(workers):
            self._idle.put(None)  # started when first needed
        atexit.register(self.close)

    def start(self) -> "TemplateSandbox":
        """Start every worker now (a server does, so the first request pays no start-up)."""
        taken = [self._idle.get() for _ in range(self._idle.qsize())]
        for worker in taken:
            self._idle.put(worker if worker is not None and worker.alive() else self._spawn())
        return self

    def _spawn(self) -> _Worker:
        worker = _Worker(self.memory_mb, self.max_chars)
        with self._lock:
            self._all = [w for w in self._all if w.alive()] + [worker]
        return worker

    def check(self, source: str) -> None:
        """TemplateRejected unless `source` compiles (in a worker: compiling evaluates the
        template's constant expressions)."""
        self._call({"check": source})

    def render(self, source: str, messages: list[dict], *, special: dict[str, str],
               add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """`infra.data.chat_template.render` in a worker: (text, assistant character spans), or
        TemplateRejected (and its subclasses) for this conversation."""
        reply = self._call({"source": source, "messages": messages, "special": special,
                            "add_generation_prompt": add_generation_prompt})
        return reply["text"], [tuple(s) for s in reply["spans"]]

    def _call(self, request: dict) -> dict:
        try:
            worker = self._idle.get(timeout=self.wait_s)
        except queue.Empty:
            raise TemplateBusy(f"every chat template renderer was busy for {self.wait_s:g} s; "
                               "retry later") from None
        try:
            if worker is None or not worker.alive():
                worker = self._spawn()
            reply = worker.call(request, self.timeout_s)
        except TemplateRejected:
            worker = None  # killed: a fresh one starts for the next render
            raise
        finally:
            self._idle.put(worker)
        if "error" in reply:
            raise TemplateRejected(reply["error"])
        return reply

    def close(self) -> None:
        with self._lock:
            workers, self._all = self._all, []
        for worker in workers:
            worker.kill()


_SHARED: TemplateSandbox | None = None
_SHARED_LOCK = threading.Lock()


def shared() -> TemplateSandbox:
    """The process's default sandbox (one worker, started on first use): what fine-tuning's
    data and the library's callers render with when they pass none."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = TemplateSandbox(1)
        return _SHARED


# --------------------------------------------------------------------------- the worker


def _limit_memory(megabytes: int) -> None:
    import resource

    limit = megabytes * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _answer(request: dict, max_chars: int) -> dict[str, Any]:
    from infra.data import chat_template
    from infra.errors import DataError

    try:
        if "check" in request:
            chat_template.compile_template(request["check"])
            return {"ok": True}
        text, spans = chat_template.render(request["source"], request["messages"],
                                  special=request["special"],
                                  add_generation_prompt=request["add_generation_prompt"])
    except DataError as e:
        return {"error": str(e)}
    if len(text) > max_chars:
        return {"error": f"the chat template renders more than {max_chars} characters for this "
                         "conversation"}
    return {"text": text, "spans": spans}


def _exit_with_parent() -> None:
    """A worker spinning in a template never reads the EOF its parent's death leaves on stdin:
    it ends itself when it is orphaned."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def serve_forever() -> None:
    """The worker: one JSON request per line on stdin, one JSON reply per line on stdout."""
    _exit_with_parent()
    _limit_memory(int(os.environ.get("INFRA_TEMPLATE_MEMORY_MB", DEFAULT_MEMORY_MB)))
    max_chars = int(os.environ.get("INFRA_TEMPLATE_MAX_CHARS", DEFAULT_MAX_CHARS))
    import jinja2  # noqa: F401 - loaded before "ready": a render's time is its own

    from infra.data import chat_template  # noqa: F401

    out = sys.stdout.buffer
    out.write(READY)
    out.flush()
    for line in sys.stdin.buffer:
        try:
            reply = _answer(json.loads(line), max_chars)
        except (ValueError, KeyError, TypeError) as e:  # not a request of ours
            reply = {"error": f"bad request to the template renderer ({type(e).__name__})"}
        except MemoryError:
            reply = {"error": "the chat template ran out of memory rendering this conversation"}
        try:
            data = json.dumps(reply).encode() + b"\n"
        except MemoryError:
            data = b'{"error": "the chat template ran out of memory rendering this conversation"}\n'
        out.write(data)
        out.flush()


if __name__ == "__main__":
    serve_forever()
