"""The scheduler of the engine, for any number of answers at once: every active request's next tokens go through
one forward pass.

An answer is a state machine (``AnswerSpec.steps`` in ``engine.decode``: ``normal_steps`` or ``parallel_steps``): a
generator that yields a :class:`PassRequest` -- "append these tokens at these positions and branches, give me
these rows' logits or argmax" -- and is sent the result (:data:`AnswerSteps`). The three stages are written once,
there. The engine multiplexes: each pass packs the pending request of every active answer (a prompt's prefill, one
token of sequential text, or one token per live branch), runs it, and hands each answer its rows (continuous
batching):

- a request joins as soon as there is room (``max_batch_size`` answers, and a region of KV slots for its prompt
  and its whole budget) and leaves at its end, freeing its region for the next one; when the slots, not
  ``max_batch_size``, keep a request waiting, the scheduler warns once;
- a request that can never fit is refused on its own, with an error naming the sizes;
- each request keeps its own settings and random stream, so its answer does not depend on the others.

Runners (``decoding.interface.Runner``): :class:`SoloRunner` runs one answer on a whole decoder (the eager
reference, or a fast decoder), which is what ``normal_decode`` / ``parallel_decode`` use;
``decoding.regions.RegionDecoder`` packs many answers into regions of one KV arena (compiled or not).
"""

from __future__ import annotations

import itertools
import warnings
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from ..decoding.interface import CacheRegion, Decoder, Keep, PassRequest, Runner

T = TypeVar("T")
# A part of an answer's state machine that returns a T: it yields the passes it needs and is sent their results.
Passes = Generator[PassRequest, torch.Tensor, T]
# An answer's whole state machine: it returns the answer's result.
AnswerSteps = Passes[dict[str, Any]]


class SoloRunner:
    """One answer at a time on one decoder (``decoding.select.decoder_for``): batch size 1."""

    max_batch_size: int | None = 1

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.busy = False

    def allocate(self, size: int, what: str) -> CacheRegion | None:
        """The whole decoder as the answer's region (it has a region's ``length``, ``crop`` and ``steps``), or None
        while another answer holds it. A decoder that cannot hold the answer refuses it before decoding."""
        if self.busy:
            return None
        self.decoder.reserve(size, what)
        self.busy = True
        return self.decoder

    def release(self, region: CacheRegion) -> None:
        self.busy = False

    def run(self, requests: list[PassRequest]) -> list[torch.Tensor]:
        (request,) = requests
        return [
            self.decoder.forward(
                request.token_ids, request.positions, request.branch_ids, request.keep, greedy=request.greedy
            )
        ]


class Slots:
    """What an answer's state machine sees of its KV cache: the decoder interface, with passes as requests.

    ``logits = yield from slots.forward(...)`` suspends the answer until the engine has run the pass.
    """

    def __init__(self, region: CacheRegion):
        self.region = region

    @property
    def length(self) -> int:
        return self.region.length

    @property
    def steps(self) -> int:
        return self.region.steps

    def crop(self, length: int) -> None:
        self.region.crop(length)

    def forward(
        self,
        token_ids: list[int],
        positions: list[int] | None = None,
        branch_ids: list[int] | None = None,
        keep: Keep = None,
        greedy: bool = False,
    ) -> Generator[PassRequest, torch.Tensor, torch.Tensor]:
        return (yield PassRequest(self.region, list(token_ids), positions, branch_ids, keep, greedy))


class Answer(Protocol):
    """What the scheduler runs (``engine.decode.AnswerSpec``): the slots it needs and its state machine."""

    @property
    def slots_needed(self) -> int: ...

    @property
    def what(self) -> str: ...

    def steps(self, slots: Slots) -> AnswerSteps: ...


@dataclass
class Request:
    """One answer in the engine: its spec, its state machine once admitted, and its result or error."""

    index: int
    spec: Answer
    on_finish: Callable[[Request], None] | None = None  # called with the request when it ends
    region: CacheRegion | None = None
    steps: AnswerSteps | None = None  # the state machine
    pending: PassRequest | None = None
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    done: bool = False
    events: list[Any] = field(default_factory=list)


class Scheduler:
    """Continuous batching of answers over one runner; each answer's spec makes its own steps."""

    def __init__(self, runner: Runner, max_batch_size: int | None = None):
        limit = runner.max_batch_size
        max_batch_size = max_batch_size or limit or 1
        if max_batch_size < 1 or (limit is not None and max_batch_size > limit):
            raise ValueError(f"max_batch_size must be between 1 and {limit or 'any'}, got {max_batch_size}")
        self.runner = runner
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.passes = 0
        self._said_why_requests_wait = False

    def submit(self, spec: Answer, on_finish: Callable[[Request], None] | None = None) -> Request:
        request = Request(next(self._ids), spec, on_finish)
        self.waiting.append(request)
        return request

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def step(self) -> list[Request]:
        """Admit what fits, run one pass over every running answer, and return the answers that ended."""
        ended = self._admit()
        if self.running:
            requests = [_pending(r) for r in self.running]
            with torch.inference_mode():
                results = self.runner.run(requests)
            self.passes += 1
            for request, result in zip(list(self.running), results):
                self._advance(request, result, ended)
        return ended

    def run_until_idle(self) -> None:
        while not self.idle:
            self.step()

    def cancel(self, request: Request) -> None:
        """Stop a request: it leaves at once and its slots go back to the pool."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            if request.steps is not None:
                request.steps.close()
            self._finish(request, [])
        request.done = True

    def _admit(self) -> list[Request]:
        ended: list[Request] = []
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            try:
                region = self.runner.allocate(request.spec.slots_needed, request.spec.what)
            except ValueError as e:  # it can never fit: refused on its own
                self.waiting.popleft()
                request.error = e
                self._finish(request, ended)
                continue
            if region is None:  # wait for a region to free up (first come, first served)
                self._say_why_requests_wait(request)
                break
            self.waiting.popleft()
            request.region = region
            request.steps = request.spec.steps(Slots(region))
            self.running.append(request)
            self._advance(request, None, ended)
        return ended

    def _say_why_requests_wait(self, request: Request) -> None:
        """Warn, once per scheduler, when a request waits for KV slots although the batch has room: the arena, not
        ``max_batch_size``, bounds how many requests run at once."""
        if self._said_why_requests_wait or len(self.running) >= self.max_batch_size:
            return
        self._said_why_requests_wait = True
        warnings.warn(
            f"a request waits for KV slots with {len(self.running)} of max_batch_size={self.max_batch_size} requests "
            f"running: the KV arena is too small for that many requests like this one ({request.spec.what}); "
            f"give the engine a larger kv_capacity to run them at once",
            stacklevel=4,
        )

    def _advance(self, request: Request, result: torch.Tensor | None, ended: list[Request]) -> None:
        if request.steps is None:
            raise RuntimeError("a request advances only once admitted")
        try:
            with torch.inference_mode():
                request.pending = next(request.steps) if result is None else request.steps.send(result)
        except StopIteration as stop:
            request.result = stop.value
            self._finish(request, ended)
        except (ValueError, RuntimeError) as e:  # a bad row, an overflow: this answer alone fails
            request.error = e
            self._finish(request, ended)

    def _finish(self, request: Request, ended: list[Request]) -> None:
        if request in self.running:
            self.running.remove(request)
        if request.region is not None:
            self.runner.release(request.region)
            request.region = None
        request.done = True
        request.pending = None
        ended.append(request)
        if request.on_finish is not None:
            request.on_finish(request)


def _pending(request: Request) -> PassRequest:
    if request.pending is None:  # a running answer always waits on one pass
        raise RuntimeError(f"request {request.index} is running without a pending pass")
    return request.pending


def slots_of(decoder: Decoder) -> Slots:
    """A whole plain decoder as the slots of one state machine (run it with :func:`drive`)."""
    return Slots(decoder)


def drive(steps: Generator[PassRequest, torch.Tensor, Any], decoder: Decoder) -> Any:
    """Run a state machine (a generator of :class:`PassRequest`) to its end on a plain decoder, one pass at a time;
    returns what the state machine returns."""
    runner = SoloRunner(decoder)
    try:
        request = next(steps)
        while True:
            (result,) = runner.run([request])
            request = steps.send(result)
    except StopIteration as stop:
        return stop.value


def run_one(scheduler: Scheduler, spec: Answer) -> dict[str, Any]:
    """One answer to its end on an otherwise idle scheduler; its error, if any, is raised."""
    request = scheduler.submit(spec)
    scheduler.run_until_idle()
    if request.error is not None:
        raise request.error
    if request.result is None:
        raise RuntimeError("the answer ended without a result")
    return request.result
