"""The server process: the model (``runs.loading``, as generate.py loads it), one batch engine, its worker thread,
the app, and uvicorn on a socket bound here (so ``--port 0`` picks a free port and the log says which).

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

from .app import ServerState, create_app
from .metrics import Metrics
from .worker import EngineWorker

log = logging.getLogger("parallel_decoding.serve")
DEFAULT_REQUEST_SLOTS = 8192  # the default arena holds --max_batch_size requests of this many tokens (or the context)


def model_id(model_path: str) -> str:
    """The served model's id: its directory's name (a hub id's last part), as generate.py names its results."""
    return Path(model_path.rstrip("/")).name or model_path


def default_kv_capacity(model, max_batch_size: int) -> int:
    """Room for ``max_batch_size`` requests of the model's context, each at most DEFAULT_REQUEST_SLOTS tokens (a
    compiled pass attends over the whole arena, so it is not made larger than the batch needs)."""
    from parallel_decoding.decoding.hf import context_length

    return max_batch_size * min(context_length(model), DEFAULT_REQUEST_SLOTS)


def load(args):
    """(model, tokenizer, model path) as the flags ask; UsageError (one line) for what cannot load."""
    from parallel_decoding.runs.loading import choose_device, load_model, resolve_model_path

    path = resolve_model_path(args.model_path)
    device, dtype = choose_device(args)
    model, tokenizer = load_model(args, path, args.attn_implementation, device, dtype)
    return model, tokenizer, path


def build_state(args, model, tokenizer, path: str) -> ServerState:
    """The engine (compiled per --compile; every bucket compiled before the first request), its worker, the app's
    state."""
    from parallel_decoding.engine.batch import Engine

    capacity = args.kv_capacity or default_kv_capacity(model, args.max_batch_size)
    log.info("engine: up to %d requests per pass, KV arena of %d tokens, compile %s", args.max_batch_size, capacity,
             args.compile)
    try:
        engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, kv_capacity=capacity,
                        compile=args.compile)
    except ValueError as e:
        raise UsageError(f"cannot build the engine: {e}") from None
    metrics = Metrics()
    worker = EngineWorker(engine, metrics, default_max_tokens=args.default_max_tokens)
    aliases = tuple(a for a in {args.model_path, path} if a and a != model_id(path))
    return ServerState(worker, metrics, tokenizer, model_id(path), max_queue=args.max_queue, api_key=args.api_key,
                       aliases=aliases)


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

    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout,
                            lifespan="on", access_log=args.log_level in ("debug", "trace"))
    return uvicorn.Server(config)


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(args) -> int:
    """Load, build, listen, serve until SIGTERM or Ctrl-C; 0 on a clean stop."""
    sock = bind(args.host, args.port)  # before loading: a port in use is a one-line error at once
    model, tokenizer, path = load(args)
    state = build_state(args, model, tokenizer, path)
    server = uvicorn_server(create_app(state), args)
    # uvicorn restores the handlers it found and re-sends the signal that stopped it: make that a no-op, so a
    # stop by signal is a clean exit.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    key = " (API key required)" if args.api_key else ""
    print(f"parallel_decoding.serve: serving {state.model_id} at {address(sock)}{key}", file=sys.stderr, flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    print("parallel_decoding.serve: stopped", file=sys.stderr, flush=True)
    return 0


def stop_on_signal_while_loading() -> None:
    """SIGTERM before the server runs: exit 0 at once (nothing is in flight)."""
    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", default=None,
                   help="a local model directory or a hub id (default: the embedded models/tiny-qwen2-retrieval)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the log names it)")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together in one pass")
    p.add_argument("--max_queue", type=int, default=64,
                   help="requests in flight (running + waiting) before new ones get 429")
    p.add_argument("--kv_capacity", type=int, default=None,
                   help=f"KV slots of the engine's arena (default: --max_batch_size x min(context, "
                        f"{DEFAULT_REQUEST_SLOTS}))")
    p.add_argument("--default_max_tokens", type=int, default=512, help="an answer's budget when a request sets none")
    p.add_argument("--api_key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PARALLEL_DECODING_API_KEY, if set)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compiled passes (auto: on for CUDA, off on a CPU)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on a CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"],
                   help="attention of the engine's passes (it builds its own mask)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow custom modeling code from the model repo")
    p.add_argument("--shutdown_timeout", type=float, default=10.0,
                   help="seconds requests in flight may take to finish after SIGTERM / Ctrl-C")
    p.add_argument("--log_level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(device_map=None, offload_folder=None)


def check_flags(args) -> None:
    for name, minimum in (("port", 0), ("max_batch_size", 1), ("max_queue", 1), ("default_max_tokens", 1)):
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {getattr(args, name)}")
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    if args.kv_capacity is not None and args.kv_capacity < 1:
        raise UsageError(f"--kv_capacity must be >= 1, got {args.kv_capacity}")
    if args.shutdown_timeout < 0:
        raise UsageError(f"--shutdown_timeout must be >= 0, got {args.shutdown_timeout}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api_key must not be empty")
