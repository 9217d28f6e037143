"""Many requests at once: every active request, each with its own tree of branches, in one forward pass.

    engine = Engine(model, tokenizer, max_batch_size=8)
    results = engine.generate(prompts, parallel=True, max_new_tokens=512, seed=0)

A branch is a stream of tokens that sees a shared prefix and itself; a request is a stream that sees only itself.
So the tokens of several requests go through one pass in one packed sequence, each request in its own region of
one KV arena (``decoding.regions``), under one mask, with no padding between requests. The scheduler
(``engine.scheduler``) admits a request as soon as there is room and frees its region when it ends; each request
runs the same state machine as ``normal_decode`` / ``parallel_decode`` (``engine.decode``), with its own settings
and random stream, so its answer does not depend on what else is in the batch.
"""

from __future__ import annotations

import hashlib

import torch

from ..decoding import flex
from ..decoding.arena import BUCKETS, FastDecoder, prepare_fast_decoder
from ..decoding.hf import check_model, context_length
from ..decoding.interface import compile_enabled
from ..decoding.regions import RegionDecoder
from .decode import AnswerSpec, BranchLimits
from .scheduler import Request, Scheduler
from .stream import AnswerStream

GENERATION_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k")


def request_seed(seed: int, index: int) -> int:
    """The seed of request ``index`` of a ``generate`` call: the first 8 bytes (little-endian) of SHA-256 of
    ``"{seed}:{index}"``, cut to 63 bits, so request i samples alike at any batch size, in any process."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def engine_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The compiled pass widths of an engine: ``decoding.arena.BUCKETS``, and with more than one request at a time
    one more of flex's query block (128 rows), so that the branch steps of several parallel answers together still
    take a compiled pass (a pass wider than the largest bucket runs uncompiled)."""
    return BUCKETS if max_batch_size == 1 else tuple(sorted({*BUCKETS, flex.BLOCK}))


class Engine:
    """Continuous batching of normal and parallel answers on one model and one KV arena.

    ``kv_capacity``: the arena's slots, shared by the requests in flight (default: the model's context length; a
    request needs its prompt plus its ``max_new_tokens``). ``compile``: as in ``normal_decode`` ("auto": on for
    CUDA); ``buckets`` the compiled pass widths (default :func:`engine_buckets`).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 8, kv_capacity: int | None = None, compile="auto",
                 buckets: tuple[int, ...] | None = None):
        check_model(model)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.compiled = compile_enabled(compile, model.device)
        capacity = kv_capacity or context_length(model)
        buckets = buckets or engine_buckets(max_batch_size)
        if self.compiled:  # the model's fast decoder: its graphs serve normal_decode(compile=True) too
            fast = prepare_fast_decoder(model, capacity, buckets=buckets, warm_up=True)
        else:
            fast = FastDecoder(model, capacity, buckets=buckets, compile=False)
        self.scheduler = Scheduler(RegionDecoder(fast), max_batch_size)

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, size: int) -> None:
        """How many requests may run at once, from the next admission on (running requests are not stopped)."""
        if size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {size}")
        self.scheduler.max_batch_size = size

    def submit(self, prompt, parallel: bool = True, logits_processor=None, on_finish=None, on_tokens=None,
               max_branches: int | None = None, **gen) -> Request:
        """Queue one request: ``prompt`` is the user message, or a list of ``{"role", "content"}`` chat messages
        (``engine.decode.chat_prompt_ids``); it joins the batch at the next :meth:`step` with room.

        ``gen`` as for ``parallel_decode`` (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``,
        ``top_k``, ``generator``). A bad prompt or setting raises ``ValueError`` here; a request that cannot fit
        in the arena ends at once with its ``error`` set. ``on_finish(request)`` is called when it ends;
        ``on_tokens(token_ids)`` with the answer's tokens as they are settled, in the final answer's order
        (``engine.stream``): joined, they are the answer's tokens.
        """
        limits = None
        if parallel:
            limits = BranchLimits() if max_branches is None else BranchLimits(max_branches=max_branches)
        stream = None if on_tokens is None else AnswerStream(on_tokens)
        spec = AnswerSpec.make(self.model, self.tokenizer, prompt, logits_processor, limits, stream, **gen)
        return self.scheduler.submit(spec, on_finish)

    def step(self) -> list[Request]:
        """One pass over every running request; returns the requests that ended in it (or were refused)."""
        return self.scheduler.step()

    def cancel(self, request: Request) -> None:
        self.scheduler.cancel(request)

    @property
    def idle(self) -> bool:
        return self.scheduler.idle

    def generate(self, prompts: list[str], parallel: bool = True, seed: int = 0, **gen) -> list[dict]:
        """Every prompt's answer, in prompt order, each as ``parallel_decode`` (or with ``parallel=False``
        ``normal_decode``) returns it; a request that failed alone has ``{"error": "Type: message"}`` instead.

        With ``do_sample``, request i samples from its own stream seeded by ``request_seed(seed, i)``, so the
        answers are the same at any ``max_batch_size``.
        """
        unknown = set(gen) - set(GENERATION_SETTINGS)
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        requests = []
        for index, prompt in enumerate(prompts):
            generator = None
            if gen.get("do_sample"):
                generator = torch.Generator(device=self.model.device).manual_seed(request_seed(seed, index))
            requests.append(self.submit(prompt, parallel=parallel, generator=generator, **gen))
        while not self.idle:
            self.step()
        return [request_outcome(request) for request in requests]


def request_outcome(request: Request) -> dict:
    """A finished request's result, or its error as one line."""
    if request.error is not None:
        lines = str(request.error).strip().splitlines()
        return {"error": f"{type(request.error).__name__}: {lines[0] if lines else ''}".rstrip(": ")}
    return request.result
