"""The HTTP routes (FastAPI): ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Every request first passes the ``guard`` (host, origin, content type, a bounded body). A chat completion is then
checked (``protocol``) and put in the chat template and tokenized by a :class:`Preparer`, on a small pool of
threads with a tokenizer each (never on the engine's thread, so a huge prompt delays only itself), then answered
by a :class:`JobResponse`, an ASGI response that owns the job from start to end: it refuses it with 429 when
--max_queue requests are in flight, hands it to the engine's thread, waits for its events on the event loop (never
blocking it), writes the answer or the stream, and, however it ends (done, client gone, server stopping), releases
the job: a request still in the engine is cancelled there, which frees its KV slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from transformers import PreTrainedTokenizerBase

from parallel_decoding.cli import one_line
from parallel_decoding.decoding.arena import ArenaFullError
from parallel_decoding.engine.decode import PromptErrorKind, chat_prompt_ids, prompt_error_kind

from . import protocol
from .guard import RequestGuard, RequestLimits
from .metrics import Metrics
from .protocol import APIError, ChatRequest
from .text import IncrementalText
from .worker import EngineWorker, Job, ServerShuttingDown

log = logging.getLogger("parallel_decoding.serve")
RETRY_AFTER_S = 1
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
PREPARE_THREADS = 2  # requests of each lane checked and tokenized at once; more wait their turn
LARGE_BODY_BYTES = 64 * 1024  # bodies from this size on take the large lane (a megabyte of text takes seconds)


class Preparer:
    """Checks a chat request and tokenizes its prompt on pools of threads, each thread with its own copy of the
    tokenizer (a fast tokenizer is not safe to share between threads, and ``split_special_tokens`` sets state on
    it). Small and large bodies have a pool each, so prompts that take seconds to tokenize delay only one another."""

    def __init__(self, tokenizer: Any, model_ids: tuple[str, ...], threads: int = PREPARE_THREADS):
        self.tokenizer, self.model_ids = tokenizer, model_ids
        self.small = ThreadPoolExecutor(threads, thread_name_prefix="parallel-decoding-prepare")
        self.large = ThreadPoolExecutor(threads, thread_name_prefix="parallel-decoding-prepare-large")
        self._local = threading.local()

    async def prepare(self, raw: bytes) -> ChatRequest:
        pool = self.large if len(raw) >= LARGE_BODY_BYTES else self.small
        return await asyncio.get_running_loop().run_in_executor(pool, self._prepare, raw)

    def _prepare(self, raw: bytes) -> ChatRequest:
        chat = protocol.parse_chat_request(raw, self.model_ids)
        try:
            chat.prompt_ids = chat_prompt_ids(self._own_tokenizer(), chat.messages)
        except ValueError as e:
            if prompt_error_kind(e) is None:  # not the prompt's fault: a server fault (the guard answers 500)
                raise
            raise engine_error(e) from None
        return chat

    def _own_tokenizer(self) -> Any:
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = _own_copy(self.tokenizer)
        return self._local.tokenizer

    def close(self) -> None:
        for pool in (self.small, self.large):
            pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class ServerState:
    """What the routes share: the engine's worker, the tokenizer (a copy of its own, for text), the names."""

    worker: EngineWorker
    metrics: Metrics
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    max_queue: int = 64
    api_key: str | None = None
    aliases: tuple[str, ...] = ()  # other names the model may be asked by (e.g. the --model_path given)
    limits: RequestLimits = field(default_factory=RequestLimits)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # jobs accepted and not released (event loop only)
    preparing: int = 0  # requests being checked and tokenized (event loop only)

    @property
    def model_ids(self) -> tuple[str, ...]:
        return (self.model_id, *self.aliases)

    def release(self, job: Job) -> None:
        if job.released:
            return
        job.released = True
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        if not job.answered:  # still in the engine, or on its way there
            self.worker.cancel(job)


class ErrorJSON(JSONResponse):
    """An error object, ASCII-escaped (so no text in a message can make it unencodable)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def error_response(error: APIError, metrics=None) -> JSONResponse:
    if metrics is not None:
        metrics.http_errors.labels(str(error.status)).inc()
    return ErrorJSON(error.body(), status_code=error.status, headers=error.headers)


PROMPT_ERROR_CODES = {PromptErrorKind.CONTEXT_LENGTH: "context_length_exceeded"}


def engine_error(error: BaseException) -> APIError:
    """The answer to a request the engine refused or failed, from the error's type (never its wording): 400 for a
    prompt the engine refuses or one that cannot fit in the KV arena (the engine's own message), 503 while
    stopping, else 500 with no internal detail (it is logged)."""
    if isinstance(error, ArenaFullError):
        return APIError(400, str(error), param="messages", code="kv_capacity_exceeded")
    kind = prompt_error_kind(error)
    if kind is not None:
        return APIError(400, str(error), param="messages", code=PROMPT_ERROR_CODES.get(kind, str(kind)))
    if isinstance(error, ServerShuttingDown):
        return APIError(503, str(error), type="server_error", code="shutting_down")
    log.error("a request failed in the engine: %s", one_line(error))
    return APIError(500, "the engine failed while answering this request", type="server_error")


class ClientGone(Exception):
    """The client closed the connection."""


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_events(job: Job, disconnected: asyncio.Future) -> list:
    """Every event of ``job`` that is ready, waiting for the first; :class:`ClientGone` if the client leaves."""
    if job.events.empty():
        getter = asyncio.ensure_future(job.events.get())
        await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            raise ClientGone
        events = [getter.result()]
    else:
        events = [job.events.get_nowait()]
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


class JobResponse(Response):
    """A chat completion from admission to its last byte (see the module docstring)."""

    def __init__(self, state: ServerState, chat: ChatRequest):
        super().__init__()
        self.state, self.chat = state, chat
        self.ident = protocol.completion_id()
        self.started = False  # the stream's headers are sent

    async def __call__(self, scope, receive, send) -> None:
        state = self.state
        if state.in_flight >= state.max_queue:
            await error_response(queue_full(state), state.metrics)(scope, receive, send)
            return
        job = Job(self.chat, asyncio.get_running_loop())
        state.in_flight += 1
        state.metrics.in_flight.set(state.in_flight)
        disconnected = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            state.worker.submit(job)
            if self.chat.stream:
                await self._stream(job, disconnected, scope, receive, send)
            else:
                await self._complete(job, disconnected, scope, receive, send)
        except ClientGone:
            log.info("client left; request %s cancelled", self.ident)
        except asyncio.CancelledError:  # the server stops and its grace time is over: say so, end cleanly
            await self._stopping(scope, receive, send)
        finally:
            disconnected.cancel()
            state.release(job)

    async def _complete(self, job: Job, disconnected, scope, receive, send) -> None:
        while True:
            for kind, value in await _next_events(job, disconnected):
                if kind == "tokens":
                    continue
                job.answered = True
                if kind == "failed":
                    await error_response(engine_error(value), self.state.metrics)(scope, receive, send)
                else:
                    body = protocol.completion_body(self.ident, self.state.model_id, value, self.chat, job.seed)
                    await JSONResponse(body)(scope, receive, send)
                return

    async def _stream(self, job: Job, disconnected, scope, receive, send) -> None:
        """Server-sent chunks; the headers wait for the first event, so a request refused by the engine still gets
        its status code."""
        events = await _next_events(job, disconnected)
        if events[0][0] == "failed":
            job.answered = True
            await error_response(engine_error(events[0][1]), self.state.metrics)(scope, receive, send)
            return
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        headers += [(k.encode(), v.encode()) for k, v in SSE_HEADERS.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True
        await self._send(send, self._chunk({"role": "assistant", "content": ""}))
        text = IncrementalText(self.state.tokenizer)
        while True:
            tokens = [t for kind, value in events if kind == "tokens" for t in value]
            delta = text.add(tokens)
            if delta:
                await self._send(send, self._chunk({"content": delta}))
            final = next((e for e in events if e[0] != "tokens"), None)
            if final is not None:
                job.answered = True
                await self._end_stream(send, job, text, *final)
                return
            events = await _next_events(job, disconnected)

    async def _end_stream(self, send, job: Job, text: IncrementalText, kind: str, value) -> None:
        if kind == "failed":
            error = engine_error(value)
            self.state.metrics.http_errors.labels(str(error.status)).inc()
            await self._send(send, error.body())
        else:
            rest = text.finish(value["response"])
            if rest:
                await self._send(send, self._chunk({"content": rest}))
            info = protocol.decoding_info(value, self.chat, job.seed)
            await self._send(send, self._chunk({}, protocol.finish_reason(value), parallel_decoding=info))
            if self.chat.include_usage:
                await self._send(
                    send, protocol.chunk_body(self.ident, self.state.model_id, None, usage=protocol.usage(value))
                )
        await self._send(send, "[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stopping(self, scope, receive, send) -> None:
        error = engine_error(ServerShuttingDown("the server stopped before the answer was finished"))
        self.state.metrics.http_errors.labels(str(error.status)).inc()
        with contextlib.suppress(Exception):
            if not self.started:
                await error_response(error)(scope, receive, send)
            else:
                await self._send(send, error.body())
                await self._send(send, "[DONE]")
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        if self.chat.include_usage:
            extra.setdefault("usage", None)
        return protocol.chunk_body(self.ident, self.state.model_id, delta, finish, **extra)

    @staticmethod
    async def _send(send, data) -> None:
        await send({"type": "http.response.body", "body": protocol.sse(data), "more_body": True})


def queue_full(state: ServerState) -> APIError:
    return APIError(
        429,
        f"the server is full ({state.in_flight} requests in flight, --max_queue {state.max_queue}); retry later",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"retry-after": str(RETRY_AFTER_S)},
    )


def check_key(state: ServerState, request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <--api_key>`` (compared in constant time)."""
    if state.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")


def create_app(state: ServerState) -> FastAPI:
    """The app; its lifespan starts the engine's thread and, at shutdown, stops it (cancelling what is left)."""

    preparer = Preparer(state.tokenizer, state.model_ids)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not state.worker.alive:
            state.worker.start()
        yield
        preparer.close()
        if not state.worker.stop(timeout=10.0):
            log.warning("the engine's thread did not stop within 10 s")

    app = FastAPI(title="parallel-decoding", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    state.tokenizer = _own_copy(state.tokenizer)
    _routes(app, state, preparer)
    app.add_middleware(RequestGuard, limits=state.limits, on_error=lambda e: _count(state, e))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error, state.metrics)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found" if error.status_code == 404 else None
        return error_response(APIError(error.status_code, str(error.detail), code=kind), state.metrics)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, error: Exception):  # what the guard did not catch
        log.error("an unexpected error answering %s: %s", request.url.path, one_line(error))
        error = APIError(500, "the server failed to answer this request", type="server_error")
        return error_response(error, state.metrics)

    return app


def _count(state: ServerState, error: APIError) -> None:
    state.metrics.http_errors.labels(str(error.status)).inc()


def _routes(app: FastAPI, state: ServerState, preparer: Preparer) -> None:
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(state, request)
        if state.in_flight + state.preparing >= state.max_queue:
            raise queue_full(state)
        body = await request.body()
        state.preparing += 1
        try:
            chat = await preparer.prepare(body)
        finally:
            state.preparing -= 1
        return JobResponse(state, chat)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(state, request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        check_key(state, request)
        if model not in state.model_ids:
            raise APIError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.get("/health")
    async def health():
        running, waiting = state.worker.load()
        ok = state.worker.alive and not state.worker.stopped
        body = {
            "status": "ok" if ok else "stopping",
            "model": state.model_id,
            "running": running,
            "waiting": waiting,
            "in_flight": state.in_flight,
            "preparing": state.preparing,  # being checked and tokenized, not yet in the engine
            "max_queue": state.max_queue,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        running, waiting = state.worker.load()
        state.metrics.load(running, waiting)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "parallel-decoding"}


def _own_copy(tokenizer):
    """The event loop's own tokenizer, so streaming text never shares one with the engine's thread."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # a tokenizer that cannot be copied: decoding alone does not change it
        return tokenizer
