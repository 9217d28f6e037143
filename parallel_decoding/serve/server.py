"""The server process: the model (``runs.loading``, as generate.py loads it), one batch engine, its worker thread,
the app, and uvicorn on a socket bound here (so ``--port 0`` picks a free port and the log says which). With
``--engine vllm|openai`` the engine is the completions method on vLLM in this process, or on an OpenAI-compatible
server (``engines.CompletionEngine``), and only the tokenizer loads here.

Stopping: SIGTERM or Ctrl-C stops accepting connections, lets the requests in flight finish for up to
``--shutdown_timeout`` seconds, cancels what is left (freeing its slots), stops the engine's thread and exits 0.
A second Ctrl-C exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from pathlib import Path

from parallel_decoding.cli import UsageError
from parallel_decoding.engine.batch import DEFAULT_REQUEST_TOKENS, default_kv_capacity
from parallel_decoding.engine.decode import DEFAULT_MAX_NEW_TOKENS

from .app import ServerState, create_app
from .connections import MAX_HEAD_BYTES, GuardedH11Protocol
from .guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, RequestLimits, is_loopback_host
from .metrics import Metrics
from .worker import EngineWorker

log = logging.getLogger("parallel_decoding.serve")
DEFAULT_IDLE_TIMEOUT_S = 5.0


def model_id(model_path: str) -> str:
    """The served model's id: its directory's name (a hub id's last part), as generate.py names its results."""
    return Path(model_path.rstrip("/")).name or model_path


def load(args):
    """(model, tokenizer, model path) as the flags ask; UsageError (one line) for what cannot load."""
    from parallel_decoding.runs.loading import load_pretrained, pick_device, resolve_model_path

    path = resolve_model_path(args.model_path)
    device, dtype = pick_device(args.device, args.dtype)
    model, tokenizer = load_pretrained(
        path, args.attn_implementation, device, dtype, trust_remote_code=args.trust_remote_code
    )
    return model, tokenizer, path


def completion_engine(args, path: str):
    """(the completions method on the serving engine --engine names, its tokenizer); UsageError (one line) for an
    engine that cannot start or a server that cannot serve the method."""
    import asyncio

    from transformers import AutoTokenizer

    from parallel_decoding.cli import one_line
    from parallel_decoding.runs.loading import pick_device
    from parallel_decoding.runs.served import start_client

    from .engines import CompletionEngine

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(f"cannot load the tokenizer of {path}: {one_line(e)}") from None
    engine_args = dict(args.engine_args)
    if args.engine == "vllm":
        engine_args.setdefault("dtype", str(pick_device(args.device, args.dtype)[1]).removeprefix("torch."))
    loop = asyncio.new_event_loop()  # the client's loop; the worker's thread runs it from now on
    client = loop.run_until_complete(
        start_client(args.engine, path, engine_args, tokenizer, args.base_url, args.engine_api_key, args.served_model)
    )
    log.info("engine: the completions method on %s", client.name)
    return CompletionEngine(client, tokenizer, loop), tokenizer


def build_state(args, model, tokenizer, path: str) -> ServerState:
    """The engine (compiled per --compile; every bucket compiled before the first request), its worker, the app's
    state. With --engine vllm|openai, ``model`` is None and the engine is :func:`completion_engine`'s."""
    if args.engine != "transformers":
        engine, tokenizer = completion_engine(args, path)
        return server_state(args, EngineWorker(engine, Metrics(), args.default_max_tokens, tokenizer), tokenizer, path)
    from parallel_decoding.engine.batch import Engine

    capacity = args.kv_capacity or default_kv_capacity(model, args.max_batch_size)
    log.info(
        "engine: up to %d requests per pass, KV arena of %d tokens, compile %s",
        args.max_batch_size,
        capacity,
        args.compile,
    )
    try:
        engine = Engine(
            model, tokenizer, max_batch_size=args.max_batch_size, kv_capacity=capacity, compile=args.compile
        )
    except ValueError as e:
        raise UsageError(f"cannot build the engine: {e}") from None
    return server_state(
        args, EngineWorker(engine, Metrics(), default_max_tokens=args.default_max_tokens), tokenizer, path
    )


def server_state(args, worker: EngineWorker, tokenizer, path: str) -> ServerState:
    aliases = tuple(a for a in {args.model_path, path} if a and a != model_id(path))
    limits = RequestLimits(
        max_body_bytes=args.max_body_bytes,
        body_timeout=args.body_timeout,
        allowed_origins=frozenset(args.allowed_origins),
        loopback_only=is_loopback_host(args.host),
    )
    return ServerState(
        worker,
        worker.metrics,
        tokenizer,
        model_id(path),
        max_queue=args.max_queue,
        api_key=args.api_key,
        aliases=aliases,
        limits=limits,
    )


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, args):
    import uvicorn

    return uvicorn.Server(uvicorn_config(app, args.log_level, args.shutdown_timeout, args.idle_timeout))


def uvicorn_config(app, log_level: str, shutdown_timeout: float, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S):
    """uvicorn on h11 with bounded request heads and idle connections closed (``connections``)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=GuardedH11Protocol,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]  # typed int, used as seconds (a float works)
        log_level=log_level,
        timeout_graceful_shutdown=shutdown_timeout,  # type: ignore[arg-type]  # likewise
        lifespan="on",
        access_log=log_level in ("debug", "trace"),
    )


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(args) -> int:
    """Load, build, listen, serve until SIGTERM or Ctrl-C; 0 on a clean stop."""
    sock = bind(args.host, args.port)  # before loading: a port in use is a one-line error at once
    if args.engine == "transformers":
        model, tokenizer, path = load(args)
    else:  # the serving engine holds the model
        from parallel_decoding.runs.loading import resolve_model_path

        model, tokenizer, path = None, None, resolve_model_path(args.model_path)
    state = build_state(args, model, tokenizer, path)
    server = uvicorn_server(create_app(state), args)
    # uvicorn restores the handlers it found and re-sends the signal that stopped it: make that a no-op, so a
    # stop by signal is a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    key = " (API key required)" if args.api_key else ""
    print(f"parallel_decoding.serve: serving {state.model_id} at {address(sock)}{key}", file=sys.stderr, flush=True)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        worker = state.worker
        close = getattr(worker.engine, "close", None)  # a serving engine's client (the thread has ended)
        if close is not None and not worker.alive:
            close()
    print("parallel_decoding.serve: stopped", file=sys.stderr, flush=True)
    return 0


def stop_on_signal_while_loading() -> None:
    """SIGTERM before the server runs: exit 0 at once (nothing is in flight)."""

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model_path",
        default=None,
        help="a local model directory or a hub id (default: the embedded models/tiny-qwen2-retrieval)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the log names it)")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together in one pass")
    p.add_argument(
        "--max_queue", type=int, default=64, help="requests in flight (running + waiting) before new ones get 429"
    )
    p.add_argument(
        "--kv_capacity",
        type=int,
        default=None,
        help=f"KV slots of the engine's arena (default: --max_batch_size x min(context, {DEFAULT_REQUEST_TOKENS}))",
    )
    budget = "an answer's budget when a request sets none"
    p.add_argument("--default_max_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help=budget)
    add_request_guard_flags(p)
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="compiled passes (auto: on for CUDA, off on a CPU)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 on CUDA, float32 on a CPU",
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--attn_implementation",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="attention of the engine's passes (it builds its own mask)",
    )
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom modeling code from the model repo")
    p.add_argument(
        "--shutdown_timeout",
        type=float,
        default=10.0,
        help="seconds requests in flight may take to finish after SIGTERM / Ctrl-C",
    )
    p.add_argument("--log_level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_flags(p)


def add_request_guard_flags(p: argparse.ArgumentParser) -> None:
    """Who may send what: the key, the body's size and time, idle connections, browser origins (``serve/guard.py``)."""
    p.add_argument(
        "--api_key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $PARALLEL_DECODING_API_KEY, if set; the "
        "variable keeps the key out of the process list)",
    )
    p.add_argument(
        "--max_body_bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body; a larger one gets 413 (default {DEFAULT_MAX_BODY_BYTES})",
    )
    p.add_argument(
        "--body_timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help=f"seconds a request's body may take to arrive; then 408 (default {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--idle_timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT_S,
        help=f"seconds a connection may wait without a whole request head before it is closed "
        f"(default {DEFAULT_IDLE_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--allowed_origins",
        nargs="*",
        default=[],
        metavar="ORIGIN",
        help="browser origins (e.g. http://localhost:3000) whose requests are answered; a request from any other "
        "origin gets 403 (default: none)",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("serving engine (README: Running on vLLM)")
    group.add_argument(
        "--engine",
        default="transformers",
        choices=["transformers", "vllm", "openai"],
        help="transformers: the project's batch engine; vllm: vLLM in this process; openai: an OpenAI-compatible "
        "server that takes token-id prompts (e.g. vLLM's own), each with the completions method in front",
    )
    group.add_argument("--base_url", default=None, help="with --engine openai: the server, e.g. http://HOST:8000/v1")
    group.add_argument(
        "--engine_api_key",
        default=None,
        help="with --engine openai: that server's key (default: $OPENAI_API_KEY); --api_key is this server's own",
    )
    group.add_argument(
        "--served_model",
        default=None,
        help="with --engine openai: the model's name on that server (default: the one model it lists)",
    )
    group.add_argument(
        "--engine_args",
        default=None,
        help="with --engine vllm: vLLM engine arguments, one JSON object, e.g. '{\"tensor_parallel_size\": 2}'",
    )


def check_flags(args) -> None:
    for name, minimum in (("port", 0), ("max_batch_size", 1), ("max_queue", 1), ("default_max_tokens", 1)):
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {getattr(args, name)}")
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    if args.kv_capacity is not None and args.kv_capacity < 1:
        raise UsageError(f"--kv_capacity must be >= 1, got {args.kv_capacity}")
    for name in ("max_body_bytes", "body_timeout", "idle_timeout"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown_timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api_key must not be empty")
    check_engine_flags(args)


def check_engine_flags(args) -> None:
    """The serving-engine flags (--engine_args read into a dict); the project engine's own flags are refused with
    another engine, which sizes, compiles and places the model itself."""
    from parallel_decoding.runs.served import check_engine_choice

    check_engine_choice(args, "engine_api_key")
    if args.engine == "transformers":
        return
    for flag, given in (
        ("kv_capacity", args.kv_capacity is not None),
        ("compile", args.compile != "auto"),
        ("device", args.device is not None),
        ("attn_implementation", args.attn_implementation != "sdpa"),
    ):
        if given:
            raise UsageError(f"--{flag} is not used with --engine {args.engine}: the serving engine decides it")
