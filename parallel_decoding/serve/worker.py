"""The engine's thread: it owns the engine (a :class:`~.engines.ServingEngine`: the project's batch engine, or the
completions method on vLLM or an OpenAI-compatible server; neither is thread-safe), takes jobs and cancellations
from the HTTP side, and steps the engine while any request is in flight (continuous batching: a request joins the
next pass that has room for it).

The HTTP side never blocks on it: :meth:`EngineWorker.submit` and :meth:`EngineWorker.cancel` only queue a command,
and each job's events (``("tokens", ids)``, ``("finished", result)``, ``("failed", exception)``) are put on the
job's asyncio queue with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from parallel_decoding.cli import one_line
from parallel_decoding.engine.decode import StopReason

from .engines import Answer, ServedRequest, ServingEngine, serving_engine
from .protocol import ChatRequest, finish_reason

log = logging.getLogger("parallel_decoding.serve")
DEFAULT_MAX_TOKENS = 512  # an answer's budget when the request sets none (normal_decode's default)


class ServerShuttingDown(RuntimeError):
    """The server stopped before the request ended."""


class EngineFailed(RuntimeError):
    """A forward pass raised: every request in it failed."""


@dataclass(eq=False)
class Job:
    """One chat completion between the HTTP side (``events``, read on ``loop``) and the worker (the rest)."""

    chat: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.perf_counter)
    request: ServedRequest | None = None  # the engine's request, once submitted
    seed: int | None = None
    first_token: bool = False
    cancelled: bool = False
    failure: BaseException | None = None  # set by the worker when it fails the job itself
    closed: bool = False  # the worker is done with it
    answered: bool = False  # the HTTP side has its last event
    released: bool = False  # the HTTP side is done with it

    def post(self, kind: str, value=None) -> None:
        """Hand an event to the HTTP side (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening
            pass


class EngineWorker:
    """The thread that runs one engine; see the module docstring."""

    def __init__(self, engine, metrics=None, default_max_tokens: int = DEFAULT_MAX_TOKENS, tokenizer=None):
        """``engine``: a ServingEngine, or the project's batch Engine (given its adapter); ``tokenizer`` makes the
        prompt ids of a job that comes without them (default: the batch engine's)."""
        self.engine: ServingEngine = serving_engine(engine)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(engine, "tokenizer", None)
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self._commands: deque = deque()
        self._wake = threading.Condition()
        self._active: dict[int, Job] = {}  # engine request index -> job (worker thread only)
        self._pending: deque[Job] = deque()  # submitted, not yet handed to the engine (worker thread only)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="parallel-decoding-engine", daemon=True)

    # --- the HTTP side's calls (any thread) --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._post("submit", job)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def cancel(self, job: Job) -> None:
        self._post("cancel", job)

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel every request and end the thread; True if it ended within ``timeout`` seconds."""
        if not self._thread.is_alive():
            self._stopped = True
            return True
        self._post("stop", None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests of the engine (a snapshot; read from any thread)."""
        running, waiting = self.engine.load
        return running, waiting + len(self._pending)

    def _post(self, kind: str, job) -> None:
        with self._wake:
            if self._stopped:  # nobody will take it: a job fails at once
                if kind == "submit":
                    job.post("failed", ServerShuttingDown("the server is shutting down"))
                return
            self._commands.append((kind, job))
            self._wake.notify()

    # --- the worker thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self._pending and self.engine.idle:
                    self._wake.wait()
                commands = list(self._commands)
                self._commands.clear()
            for i, (kind, job) in enumerate(commands):
                if kind == "stop":
                    self._shutdown(commands[i + 1 :])
                    return
                if kind == "submit":
                    self._pending.append(job)
                else:
                    self._guarded(self._cancel, job)
            while self._pending:  # every new request joins the next pass that has room for it
                self._guarded(self._submit, self._pending.popleft())
            if not self.engine.idle:
                self._step()

    def _guarded(self, action, job: Job) -> None:
        try:
            action(job)
        except Exception as e:  # a bug here must not stop the thread: that job fails alone
            log.exception("the worker could not %s a request", action.__name__.strip("_"))
            self._fail(job, e)

    def _submit(self, job: Job) -> None:
        if job.cancelled:  # the client left before the job reached the engine
            job.closed = True
            self._count_end(job, StopReason.CANCELLED)
            return
        try:
            request = self.engine.submit(
                self._answer(job),
                on_tokens=lambda ids: self._tokens(job, ids),
                on_finish=lambda r: self._finished(job, r),
            )
        except (ValueError, TypeError) as e:  # a bad prompt or setting: refused before it queues
            job.closed = True
            job.post("failed", e)
            self._count_end(job, "error")
            return
        job.request = request
        self._active[request.index] = job

    def _answer(self, job: Job) -> Answer:
        """What the job asks the engine for. The HTTP side tokenizes the prompt off this thread (``app.Preparer``); a
        job submitted without it (a caller that skips the HTTP side) has its ids made here (ValueError for a prompt
        the template refuses)."""
        from parallel_decoding.engine.decode import chat_prompt_ids

        if job.chat.sampling:
            job.seed = secrets.randbits(63) if job.chat.seed is None else job.chat.seed % 2**64
        if job.chat.prompt_ids is None:
            if self.tokenizer is None:
                raise ValueError("the request has no prompt ids and this worker has no tokenizer to make them")
            job.chat.prompt_ids = chat_prompt_ids(self.tokenizer, job.chat.messages)
        return Answer(
            job.chat.prompt_ids,
            job.chat.parallel,
            job.chat.max_branches,
            job.chat.generation(self.default_max_tokens),
            job.seed,
        )

    def _tokens(self, job: Job, token_ids: list[int]) -> None:
        if not job.first_token and self.metrics is not None:
            self.metrics.first_token.labels(job.chat.mode).observe(time.perf_counter() - job.created)
        job.first_token = True
        job.post("tokens", token_ids)

    def _finished(self, job: Job, request) -> None:
        """The engine's ``on_finish``: also called by ``engine.cancel`` for a running request."""
        self._active.pop(request.index, None)
        if job.closed:
            return
        job.closed = True
        if job.cancelled:
            self._count_end(job, StopReason.CANCELLED)
        elif job.failure is not None or request.error is not None:
            job.post("failed", job.failure or request.error)
            self._count_end(job, "error")
        else:
            job.post("finished", request.result)
            if self.metrics is not None:
                latency = time.perf_counter() - job.created
                self.metrics.finished(job.chat.mode, request.result, finish_reason(request.result), latency)

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        self._release(job)

    def _fail(self, job: Job, error: BaseException) -> None:
        job.failure = error
        self._release(job)
        if not job.closed:  # it never reached the engine
            job.closed = True
            job.post("failed", error)
            self._count_end(job, "error")

    def _release(self, job: Job) -> None:
        """Take the job's request out of the engine (its slots go back to the pool)."""
        request = job.request
        if request is not None and not request.done:
            try:
                self.engine.cancel(request)  # a running request's on_finish runs here
            except Exception:  # its state machine would not close: the request is out of the engine's lists anyway
                log.exception("cancelling a request raised")
        if request is not None and not job.closed:  # a waiting one's does not
            self._finished(job, request)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            ended = self.engine.step()
        except Exception as e:  # the pass itself failed: every request in flight fails, the server goes on
            in_pass = [job for job in self._active.values() if self.engine.admitted(job.request)]
            log.exception("a forward pass failed; failing its %d requests", len(in_pass))
            failure = EngineFailed(f"the engine failed: {one_line(e)}")
            for job in in_pass:
                self._fail(job, failure)
            return
        if self.metrics is not None:
            running, waiting = self.load()
            admitted = sum(1 for r in ended if self.engine.admitted(r))  # ended in this pass, so they were in it
            self.metrics.step(time.perf_counter() - start, running + admitted, running, waiting)

    def _shutdown(self, commands: list) -> None:
        stopping = ServerShuttingDown("the server is shutting down")
        with self._wake:
            self._stopped = True
            commands = commands + list(self._commands)
            self._commands.clear()
        pending = [job for kind, job in commands if kind == "submit"] + list(self._pending)
        self._pending.clear()
        for job in pending:
            self._fail(job, stopping)
        for job in list(self._active.values()):
            self._fail(job, stopping)
        if self.metrics is not None:
            self.metrics.load(0, 0)

    def _count_end(self, job: Job, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.ended(job.chat.mode, outcome)
