"""The one engine interface the server's worker talks to (:class:`ServingEngine`), and its two implementations:

- :class:`ProjectEngine`: this project's batch engine (``engine.batch.Engine``, continuous batching on
  transformers), one pass per :meth:`~ProjectEngine.step`;
- :class:`CompletionEngine`: the completions method (``completions.method``) on a stock serving engine's client
  (vLLM in-process, or an OpenAI-compatible server), which does the batching itself. Its requests are coroutines
  on an asyncio loop that only the worker's thread runs, inside :meth:`~CompletionEngine.step`, so every callback
  (tokens, finish) comes on the worker's thread, as the project's engine gives them.

A request is submitted as the prompt's token ids (the chat template already applied) with an :class:`Answer`'s
settings; the worker sees requests only through :class:`ServedRequest`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# How long one step of a CompletionEngine waits for a request to end before it hands the thread back to the worker,
# which then takes new requests and cancellations: the most a new request waits to reach the engine.
STEP_WAIT_SECONDS = 0.02

TokensCallback = Callable[[list[int]], None]


@dataclass(frozen=True)
class Answer:
    """What one request decodes: the prompt's ids and the answer's settings."""

    prompt_ids: list[int]
    parallel: bool
    max_branches: int | None
    generation: dict[str, Any]  # max_new_tokens, and with sampling do_sample, temperature, top_p, top_k
    seed: int | None  # the request's random stream (sampling only)


class ServedRequest(Protocol):
    """A request in an engine, as the worker sees it."""

    index: int  # unique in its engine
    done: bool
    result: dict | None  # what normal_decode / parallel_decode return, once done without error
    error: BaseException | None


FinishCallback = Callable[[Any], None]  # called with the ServedRequest when it ends


class ServingEngine(Protocol):
    """An engine the server's worker thread drives; none of its methods is called from another thread."""

    def submit(self, answer: Answer, on_tokens: TokensCallback, on_finish: FinishCallback) -> ServedRequest:
        """Queue a request; a bad prompt or setting raises ValueError or TypeError here. ``on_tokens`` gets the
        answer's ids in answer order as they settle; ``on_finish`` the request when it ends."""
        ...

    def cancel(self, request: Any) -> None:
        """Take a request out (its resources go back); its ``on_finish`` may or may not run."""
        ...

    def step(self) -> list[Any]:
        """Advance the requests in flight (one pass, or one wait for progress); the requests that ended in it."""
        ...

    @property
    def idle(self) -> bool: ...

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        ...

    def admitted(self, request: Any) -> bool:
        """Whether the request has started decoding (a failed pass fails only the admitted ones)."""
        ...


class ProjectEngine:
    """This project's batch engine behind :class:`ServingEngine`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def submit(self, answer: Answer, on_tokens: TokensCallback, on_finish: FinishCallback) -> Any:
        import torch

        gen = dict(answer.generation)
        if answer.seed is not None:
            gen["generator"] = torch.Generator(device=self.engine.model.device).manual_seed(answer.seed)
        return self.engine.submit(
            answer.prompt_ids,
            parallel=answer.parallel,
            max_branches=answer.max_branches,
            on_tokens=on_tokens,
            on_finish=on_finish,
            **gen,
        )

    def cancel(self, request: Any) -> None:
        self.engine.cancel(request)

    def step(self) -> list[Any]:
        return self.engine.step()

    @property
    def idle(self) -> bool:
        return bool(self.engine.idle)

    @property
    def load(self) -> tuple[int, int]:
        return self.engine.load

    def admitted(self, request: Any) -> bool:
        return request.steps is not None


def serving_engine(engine: Any) -> ServingEngine:
    """``engine`` as a ServingEngine: a project batch engine gets its adapter, a ServingEngine is itself."""
    from parallel_decoding.engine.batch import Engine

    return ProjectEngine(engine) if isinstance(engine, Engine) else engine


@dataclass(eq=False)
class CompletionRequest:
    """One answer of a CompletionEngine: its coroutine's task, and its outcome."""

    index: int
    answer: Answer
    on_finish: FinishCallback
    task: asyncio.Task | None = field(default=None, repr=False)
    done: bool = False
    result: dict | None = None
    error: BaseException | None = None


class CompletionEngine:
    """The completions method on a serving engine's client (see the module docstring). ``loop``: the loop the
    client was made on; from now on only the worker's thread runs it."""

    def __init__(self, client: Any, tokenizer: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.client, self.tokenizer, self.loop = client, tokenizer, loop
        self.name = client.name
        self._ids = itertools.count()
        self._requests: dict[int, CompletionRequest] = {}  # in flight, cancelled ones until their task ends
        self._ended: list[CompletionRequest] = []

    def submit(self, answer: Answer, on_tokens: TokensCallback, on_finish: FinishCallback) -> CompletionRequest:
        if not answer.prompt_ids:
            raise ValueError("the prompt is empty")
        request = CompletionRequest(next(self._ids), answer, on_finish)
        request.task = self.loop.create_task(self._decode(request, on_tokens))
        self._requests[request.index] = request
        return request

    async def _decode(self, request: CompletionRequest, on_tokens: TokensCallback) -> None:
        """Run one answer to its end; a cancelled one ends silently (the worker closed it already)."""
        from parallel_decoding.completions.method import normal_generate, parallel_generate

        answer = request.answer
        gen = dict(answer.generation, seed=answer.seed) if answer.seed is not None else dict(answer.generation)
        try:
            if answer.parallel:
                branches = {} if answer.max_branches is None else {"max_branches": answer.max_branches}
                request.result = await parallel_generate(
                    self.client, self.tokenizer, answer.prompt_ids, gen, on_tokens=on_tokens, **branches
                )
            else:
                request.result = await normal_generate(
                    self.client, self.tokenizer, answer.prompt_ids, gen, on_tokens=on_tokens
                )
        except asyncio.CancelledError:
            self._requests.pop(request.index, None)
            raise
        except Exception as e:  # the engine's error for this request alone (bad setting, server error, timeout)
            request.error = e
        request.done = True
        self._requests.pop(request.index, None)
        self._ended.append(request)
        request.on_finish(request)

    def cancel(self, request: Any) -> None:
        if not request.done and request.task is not None:
            request.task.cancel()  # the client aborts the engine's requests when the next step runs the loop
            request.done = True

    def step(self) -> list[Any]:
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        if tasks:
            self.loop.run_until_complete(
                asyncio.wait(tasks, timeout=STEP_WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            )
        ended, self._ended = self._ended, []
        return ended

    @property
    def idle(self) -> bool:
        return not self._requests

    @property
    def load(self) -> tuple[int, int]:
        running = sum(1 for r in self._requests.values() if not r.done)
        return running, 0  # the serving engine queues what it cannot run yet; it is all "running" from here

    def admitted(self, request: Any) -> bool:
        return True

    def close(self) -> None:
        """Cancel what is left and close the client (on the worker's thread, or after it ended)."""
        for request in list(self._requests.values()):
            self.cancel(request)
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        if tasks:
            self.loop.run_until_complete(asyncio.wait(tasks))
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()
