"""The scheduler of the engine, for any number of answers at once: every active request's next tokens go through one forward pass.

An answer is a state machine (``decode.answer_steps``): a generator that yields a :class:`PassRequest` -- "append
these tokens at these positions and branches, give me these rows' logits or argmax" -- and is sent the result.
The three stages are written once, there. The engine multiplexes: each pass packs the pending request of every
active answer (a prompt's prefill, one token of sequential text, or one token per live branch), runs it, and hands
each answer its rows (continuous batching):

- a request joins as soon as there is room (``max_batch_size`` answers, and a region of KV slots for its prompt
  and its whole budget) and leaves at its end, freeing its region for the next one;
- a request that can never fit is refused on its own, with an error naming the sizes;
- each request keeps its own settings and random stream, so its answer does not depend on the others.

Backends: :class:`SoloBackend` runs one answer on a whole decoder (the eager reference, or the model's fast
decoder), which is what ``normal_decode`` / ``parallel_decode`` use; ``decoding.regions.RegionDecoder`` packs many
answers into regions of one KV arena (compiled or not).
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from ..decoding.regions import PassRequest


class SoloBackend:
    """One answer at a time on one decoder (``decoding.select.decoder_for``): batch size 1."""

    max_batch_size = 1

    def __init__(self, decoder):
        self.decoder = decoder
        self.busy = False

    def allocate(self, size: int, what: str):
        """The whole decoder as the answer's region (it has a region's ``length``, ``crop`` and ``steps``), or None
        while another answer holds it."""
        if self.busy:
            return None
        if hasattr(self.decoder, "reserve"):  # a fixed arena: refuse the answer before decoding if it cannot fit
            self.decoder.reserve(size, what)
        self.busy = True
        return self.decoder

    def release(self, region) -> None:
        self.busy = False

    def run(self, requests: list[PassRequest]) -> list[torch.Tensor]:
        (request,) = requests
        return [self.decoder.forward(request.token_ids, request.positions, request.branch_ids, request.keep,
                                     greedy=request.greedy)]


class Slots:
    """What an answer's state machine sees of its KV cache: the decoder interface, with passes as requests.

    ``logits = yield from slots.forward(...)`` suspends the answer until the engine has run the pass.
    """

    def __init__(self, region):
        self.region = region

    @property
    def length(self) -> int:
        return self.region.length

    @property
    def steps(self) -> int:
        return self.region.steps

    def crop(self, length: int) -> None:
        self.region.crop(length)

    def forward(self, token_ids, positions=None, branch_ids=None, keep=None, greedy: bool = False):
        return (yield PassRequest(self.region, list(token_ids), positions, branch_ids, keep, greedy))


@dataclass
class Request:
    """One answer in the engine: its spec, its state machine once admitted, and its result or error."""

    index: int
    spec: object  # decode.AnswerSpec
    on_finish: object = None  # called with the request when it ends
    region: object = None
    steps: object = None  # the state machine (a generator)
    pending: PassRequest | None = None
    result: dict | None = None
    error: BaseException | None = None
    done: bool = False
    events: list = field(default_factory=list)


class Scheduler:
    """Continuous batching of answers over one backend; each answer's spec makes its own steps."""

    def __init__(self, backend, max_batch_size: int | None = None):
        limit = getattr(backend, "max_batch_size", None)
        max_batch_size = max_batch_size or limit or 1
        if max_batch_size < 1 or (limit is not None and max_batch_size > limit):
            raise ValueError(f"max_batch_size must be between 1 and {limit or 'any'}, got {max_batch_size}")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.passes = 0

    def submit(self, spec, on_finish=None) -> Request:
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
            requests = [r.pending for r in self.running]
            with torch.inference_mode():
                results = self.backend.run(requests)
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
            request.steps.close()
            self._finish(request, [])
        request.done = True

    def _admit(self) -> list[Request]:
        ended = []
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            try:
                region = self.backend.allocate(request.spec.slots_needed, request.spec.what)
            except ValueError as e:  # it can never fit: refused on its own
                self.waiting.popleft()
                request.error = e
                self._finish(request, ended)
                continue
            if region is None:  # wait for a region to free up (first come, first served)
                break
            self.waiting.popleft()
            request.region = region
            request.steps = request.spec.steps(Slots(region))
            self.running.append(request)
            self._advance(request, None, ended)
        return ended

    def _advance(self, request: Request, result, ended: list) -> None:
        try:
            with torch.inference_mode():
                request.pending = request.steps.send(result)
        except StopIteration as stop:
            request.result = stop.value
            self._finish(request, ended)
        except (ValueError, RuntimeError) as e:  # a bad row, an overflow: this answer alone fails
            request.error = e
            self._finish(request, ended)

    def _finish(self, request: Request, ended: list) -> None:
        if request in self.running:
            self.running.remove(request)
        if request.region is not None:
            self.backend.release(request.region)
            request.region = None
        request.done = True
        request.pending = None
        ended.append(request)
        if request.on_finish is not None:
            request.on_finish(request)


def slots_of(decoder) -> Slots:
    """A whole plain decoder as the slots of one state machine (run it with :func:`drive`)."""
    return Slots(decoder)


def drive(steps, decoder):
    """Run a state machine (a generator of :class:`PassRequest`) to its end on a plain decoder, one pass at a time;
    returns what the state machine returns."""
    backend, result = SoloBackend(decoder), None
    while True:
        try:
            request = steps.send(result)
        except StopIteration as stop:
            return stop.value
        (result,) = backend.run([request])


def run_one(scheduler: Scheduler, spec) -> dict:
    """One answer to its end on an otherwise idle scheduler; its error, if any, is raised."""
    request = scheduler.submit(spec)
    scheduler.run_until_idle()
    if request.error is not None:
        raise request.error
    return request.result
