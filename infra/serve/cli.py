"""`python -m infra serve --workdir runs/x [--host 127.0.0.1] [--port 8000] [--slots 8]`.

Start-up checks what can be wrong in a second before the minute of loading and compiling: the
port is bound first (a port in use is refused at once), the chat template parsed and its
renderer processes started (`infra.data.template_sandbox`); then the newest checkpoint is
restored onto the serving mesh, every step compiled (`warmup`), the scheduler's thread started,
and the socket starts listening, served by uvicorn in a thread; the line `serving <model> on
http://<host>:<port>/v1` (stdout) says it is ready, and so does `GET /health` (200). `--port 0`
picks a free port (the line names it).

`--api_key` (or the environment variable `INFRA_SERVE_API_KEY`, which keeps the key out of the
process list) makes the `/v1` routes require `Authorization: Bearer <key>`.

SIGTERM drains. The CLI's process-wide handler (`infra.process.catch_sigterm`) only
raises a flag; uvicorn runs outside the main thread, so it installs no handlers of its own and
the main thread, which watches the flag, decides: new requests get 503 (and /health 503),
running and queued ones finish, at most `--drain_timeout` seconds (then they are cancelled),
and the process exits 0. The flag's grace timer is set beyond that, so a hung drain still ends
(exit 143); a second SIGTERM ends it at once. Ctrl-C stops at once (exit 130).

The web stack is the `serve` extra (`pip install -e ".[serve]"`): training needs none of it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

from infra import compile_cache, paths
from infra.data import chat, template_sandbox
from infra.errors import UserError

log = logging.getLogger(__name__)
API_KEY_ENV = "INFRA_SERVE_API_KEY"
NEEDS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client",
         "jinja2": "jinja2"}


def check_dependencies() -> None:
    import importlib.util

    missing = [pkg for module, pkg in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"serving needs {', '.join(missing)}: pip install -e \".[serve]\" "
                        f"(or pip install {' '.join(missing)})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", required=True, help="workdir of a trained, fine-tuned or imported LM")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429")
    p.add_argument("--max_len", type=int, default=None,
                   help="context per slot (default model.max_seq_len)")
    p.add_argument("--page_size", type=int, default=16,
                   help="positions per KV-cache page (= --max_len: one dense page per slot)")
    p.add_argument("--kv_tokens", type=int, default=None,
                   help="positions the KV cache holds in all (default: every slot's whole "
                        "context); fewer: requests wait, or the newest are preempted, when full")
    p.add_argument("--prefill_chunk", type=int, default=None,
                   help="the most prompt tokens prefilled per step (longer prompts take several "
                        "steps, decoding goes on between; default 64 on CPU, 512 elsewhere)")
    p.add_argument("--prefill_rows", type=int, default=8,
                   help="the most short prompts prefilled in one call (as many as fit "
                        "--prefill_chunk in 16-token buckets)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="serve the projection weights as int8 (per-channel scales; the "
                        "checkpoint stays float)")
    p.add_argument("--kv_cache", choices=("auto", "int8"), default="auto",
                   help="KV cache storage: the model's compute dtype, or int8 with a scale per "
                        "position and head (about a quarter of float32's bytes)")
    p.add_argument("--tensor", type=int, default=None,
                   help="devices per model replica along kv heads (default: the most that divide them)")
    p.add_argument("--model_name", default=None, help="the model id clients pass (default: the workdir's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=WORKDIR",
                   help="also serve this LoRA run (fine-tuned from --workdir) as model NAME; "
                        "repeat for several, mixed in one batch")
    p.add_argument("--drain_timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may take to finish")
    p.add_argument("--api_key", default=None,
                   help=f"require 'Authorization: Bearer <key>' on /v1 (default: ${API_KEY_ENV})")
    p.add_argument("--max_body_mb", type=float, default=8.0,
                   help="largest request body accepted (413 beyond)")
    p.add_argument("--template_timeout", type=float, default=template_sandbox.DEFAULT_TIMEOUT_S,
                   help="seconds a chat template may take to render a conversation (400 beyond)")
    p.add_argument("--static", action="store_true",
                   help="static batching (a batch finishes before the next starts): a benchmark baseline")
    p.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another "
                        f"--port (0 = any free one)") from None
    return sock


def _check_arguments(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_queue < 0 or args.drain_timeout < 0:
        raise UserError("--max_queue and --drain_timeout must be >= 0")
    if not args.max_body_mb > 0 or not args.template_timeout > 0:
        raise UserError("--max_body_mb and --template_timeout must be > 0")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty; pass a key, or leave it out to serve without one")
    if min(args.page_size, args.prefill_chunk or 1, args.kv_tokens or 1, args.prefill_rows) < 1:
        raise UserError("--page_size, --prefill_chunk, --prefill_rows and --kv_tokens must be "
                        ">= 1")
    adapter_names(args)


def adapter_names(args) -> dict[str, str]:
    """{name: workdir} of the `--adapter NAME=WORKDIR` flags, checked."""
    named = {}
    for item in args.adapter:
        name, sep, workdir = item.partition("=")
        if not sep or not name.strip() or not workdir.strip():
            raise UserError(f"--adapter {item!r}: expected NAME=WORKDIR (e.g. "
                            "--adapter sql=runs/sql-lora)")
        if name in named or name == args.model_name:
            raise UserError(f"--adapter {name!r}: the name is used twice")
        named[name] = workdir
    return named


def run_cli(args) -> int:
    check_dependencies()
    _check_arguments(args)
    from infra import process
    from infra.data.tokenizer import load_tokenizer
    from infra.mesh import serve_mesh
    from infra.run import load_config
    from infra.serve.engine import Engine
    from infra.serve.prometheus import PrometheusMetrics
    from infra.serve.scheduler import Scheduler
    from infra.serve.server import Api

    flag = process.catch_sigterm()
    flag.grace_s = args.drain_timeout + 30  # the bound of a drain that hangs (exit 143)
    sock = _bind(args.host, args.port)  # before the slow part: a port in use fails at once
    config = load_config(args.workdir, command="serve")
    template = chat.run_template(config, load_tokenizer(config.data.tokenizer))
    sandbox = template_sandbox.TemplateSandbox(2, timeout_s=args.template_timeout).start()
    sandbox.check(template)  # one that does not parse fails before the warm-up
    adapters = adapter_names(args)
    pages = None if args.kv_tokens is None else 1 + -(-args.kv_tokens // args.page_size)
    engine = Engine.from_workdir(
        args.workdir, slots=args.slots, mesh=serve_mesh(config, tensor=args.tensor),
        max_len=args.max_len, adapters=adapters, page_size=args.page_size, num_pages=pages,
        prefill_chunk=args.prefill_chunk, prefill_rows=args.prefill_rows, quantize=args.quantize,
        kv_cache=args.kv_cache)
    start = time.perf_counter()
    compile_s = engine.warmup()
    cached = compile_cache.stats()["hits"]
    log.info("warm-up: %.1f s (%.1f s compiling %d prefill shapes and the decode step%s)",
             time.perf_counter() - start, compile_s, len(engine.prefill_shapes),
             f"; {cached} programs from the compilation cache" if cached else "")
    metrics = PrometheusMetrics()
    scheduler = Scheduler(engine, engine.tokenizer, max_queue=args.max_queue,
                          static=args.static, metrics=metrics)
    metrics.bind(scheduler)
    scheduler.start()
    name = args.model_name or paths.path(args.workdir).name
    api = Api(scheduler, engine.tokenizer, [name, *adapters], metrics, template, sandbox=sandbox,
              api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
              max_body_bytes=int(args.max_body_mb * 2**20))
    server, thread = _start_http(api, sock)
    print(_banner(sock, [name, *adapters], engine, args, api.api_key), flush=True)
    try:
        while thread.is_alive() and not flag.raised:
            time.sleep(0.05)
        if flag.raised:
            _drain(api, scheduler, args.drain_timeout, flag)
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.stop()
        sandbox.close()
    return 0


def _banner(sock: socket.socket, names: list[str], engine, args, api_key) -> str:
    """The line `serve` prints once it listens (tests and launchers read the address)."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return (f"serving {', '.join(names)} on http://{shown}:{port}/v1 ({engine.slots} slots x "
            f"{engine.max_len} tokens, KV cache {engine.cache_bytes() / 2**20:.1f} MiB in "
            f"{engine.pool.num_pages} pages of {engine.page_size}, mesh {dict(engine.mesh.shape)}, "
            f"checkpoint step {engine.step_restored}{', static batching' if args.static else ''}"
            f"{', int8 weights' if args.quantize == 'int8' else ''}"
            f"{', int8 KV cache' if args.kv_cache == 'int8' else ''}"
            f"{', API key required' if api_key else ''})")


def _start_http(api, sock: socket.socket):
    """(uvicorn server, its thread): the routes served on the bound socket, started."""
    import uvicorn

    from infra.serve.routes import create_app

    sock.listen(2048)
    sock.set_inheritable(True)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_app(api), log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                              daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise UserError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    return server, thread


def _drain(api, scheduler, timeout: float, flag) -> None:
    """No new requests; the running and queued ones finish within `timeout` s, or are cancelled."""
    api.draining = True
    scheduler.accepting = False
    waiting = len(scheduler.queue) + scheduler.busy
    print(f"SIGTERM: draining {waiting} request(s) (at most {timeout:g} s)", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + timeout
    while not scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not scheduler.idle():
        left = [r for r in [*scheduler.slots, *scheduler.queue] if r is not None]
        for r in left:
            scheduler.cancel(r)
        print(f"drain timeout: cancelled {len(left)} request(s)", file=sys.stderr, flush=True)
        end = time.monotonic() + 5
        while not scheduler.idle() and time.monotonic() < end:
            time.sleep(0.05)
    time.sleep(0.2)  # let the last responses reach their clients
    print("drained; exiting", file=sys.stderr, flush=True)
