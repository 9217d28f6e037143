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

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..decoding import flex
from ..decoding.arena import BUCKETS, FastDecoder, prepare_fast_decoder
from ..decoding.hf import check_model, context_length
from ..decoding.interface import compile_enabled
from ..decoding.regions import RegionDecoder
from .decode import AnswerSpec, BranchLimits, _generation_config, answer_budget, is_token_ids
from .sampling import stream_seed
from .scheduler import Request, Scheduler
from .stream import AnswerStream

GENERATION_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k")


def request_seed(seed: int, index: int) -> int:
    """The seed of request ``index`` of a ``generate`` call (:func:`~.sampling.stream_seed` of ``seed, index``), so
    request i samples alike at any batch size, in any process."""
    return stream_seed(seed, index)


DEFAULT_REQUEST_TOKENS = 8192  # the default arena holds max_batch_size requests of this many tokens (or the context)


def kv_capacity_for(batch_size: int, request_tokens: int, context: int | None = None) -> int:
    """KV slots for ``batch_size`` requests in flight of ``request_tokens`` each (a prompt and its answer budget:
    ``max_new_tokens`` bounds every answer, branches included, and a block's branches replace its skeleton in the
    cache, so no request holds more), each at most the model's ``context`` (a longer request is refused before it
    needs slots). The one sizing rule of the engine's arena: the engine's default, the run's and the server's."""
    if batch_size < 1 or request_tokens < 1:
        raise ValueError(f"a KV arena needs batch_size and request_tokens >= 1, got {batch_size} and {request_tokens}")
    return batch_size * (request_tokens if context is None else min(request_tokens, context))


def engine_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The compiled pass widths of an engine: ``decoding.arena.BUCKETS``, and with more than one request at a time
    one more of flex's query block (128 rows), so that the branch steps of several parallel answers together still
    take a compiled pass (a pass wider than the largest bucket runs uncompiled)."""
    return BUCKETS if max_batch_size == 1 else tuple(sorted({*BUCKETS, flex.BLOCK}))


def default_kv_capacity(model, max_batch_size: int) -> int:
    """The engine's arena when none is given: ``max_batch_size`` requests of the model's context, each at most
    ``DEFAULT_REQUEST_TOKENS`` (a compiled dense pass attends over the whole arena, so it is no larger)."""
    return kv_capacity_for(max_batch_size, DEFAULT_REQUEST_TOKENS, context_length(model))


def engine_decoder(
    model: PreTrainedModel,
    max_batch_size: int,
    kv_capacity: int | None = None,
    compile: Any = "auto",
    buckets: tuple[int, ...] | None = None,
) -> FastDecoder:
    """The fast decoder an :class:`Engine` makes when given none: an arena of ``kv_capacity`` slots (default
    :func:`default_kv_capacity`), compiled as ``compile`` says (every bucket compiled now), with the pass widths
    ``buckets`` (default :func:`engine_buckets`)."""
    capacity = kv_capacity or default_kv_capacity(model, max_batch_size)
    compiled = compile_enabled(compile, model.device)
    buckets = buckets or engine_buckets(max_batch_size)
    return prepare_fast_decoder(model, capacity, buckets=buckets, warm_up=compiled, compile=compiled)


class Engine:
    """Continuous batching of normal and parallel answers on one model and one KV arena.

    ``kv_capacity``: the arena's slots, shared by the requests in flight; a request needs its prompt plus its
    ``max_new_tokens``. The default, :func:`kv_capacity_for` ``(max_batch_size, DEFAULT_REQUEST_TOKENS, context)``,
    holds ``max_batch_size`` requests of up to the model's context (or ``DEFAULT_REQUEST_TOKENS``) each, so a full
    batch runs at once; with a smaller arena, requests that do not fit wait, and the engine says so once (a
    warning). ``compile``: as in ``normal_decode`` ("auto": on for CUDA); ``buckets`` the compiled pass widths
    (default :func:`engine_buckets`). ``decoder``: the fast decoder whose arena and graphs the engine uses, held by
    the caller (then ``kv_capacity``, ``compile`` and ``buckets`` are its own); default :func:`engine_decoder`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 8,
        kv_capacity: int | None = None,
        compile: Any = "auto",
        buckets: tuple[int, ...] | None = None,
        decoder: FastDecoder | None = None,
    ):
        check_model(model)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        if decoder is None:
            decoder = engine_decoder(model, max_batch_size, kv_capacity, compile, buckets)
        elif decoder.model is not model:
            raise ValueError("the engine's decoder must run the engine's model")
        self.decoder = decoder  # the arena the requests' regions lie in, and its compiled graphs
        self.compiled = decoder.compiled
        self.scheduler = Scheduler(RegionDecoder(decoder), max_batch_size)

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, size: int) -> None:
        """How many requests may run at once, from the next admission on (running requests are not stopped)."""
        if size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {size}")
        self.scheduler.max_batch_size = size

    def submit(
        self,
        prompt,
        parallel: bool = True,
        logits_processor=None,
        on_finish=None,
        on_tokens=None,
        max_branches: int | None = None,
        **gen,
    ) -> Request:
        """Queue one request: ``prompt`` is the user message, a list of ``{"role", "content"}`` chat messages
        (``engine.decode.chat_prompt_ids``), or the prompt's token ids with the chat template already applied (a
        server tokenizes off this thread); it joins the batch at the next :meth:`step` with room.

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
        spec = answer_spec(self.model, self.tokenizer, prompt, logits_processor, limits, stream, gen)
        return self.scheduler.submit(spec, on_finish)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests: a snapshot, for a server's metrics and health."""
        return len(self.scheduler.running), len(self.scheduler.waiting)

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


def answer_spec(model, tokenizer, prompt, logits_processor, limits, stream, gen: dict) -> AnswerSpec:
    """The checked spec of one request; ``prompt`` as :meth:`Engine.submit` takes it."""
    if not is_token_ids(prompt):
        return AnswerSpec.make(model, tokenizer, prompt, logits_processor, limits, stream, **gen)
    config = _generation_config(gen)
    budget = answer_budget(config.max_new_tokens, len(prompt), context_length(model))
    return AnswerSpec(model, tokenizer, list(prompt), config, budget, logits_processor, limits, stream)


def request_outcome(request: Request) -> dict[str, Any]:
    """A finished request's result, or its error as one line."""
    if request.error is not None:
        lines = str(request.error).strip().splitlines()
        return {"error": f"{type(request.error).__name__}: {lines[0] if lines else ''}".rstrip(": ")}
    if request.result is None:
        raise RuntimeError(f"request {request.index} has not finished")
    return request.result
