"""The small asynchronous completion interface the stage-level method (``completions.method``) runs against.

A request is token ids in, with ``max_tokens``, stop token ids and the sampling settings; a completion is the
generated ids and why generation stopped. Every serving engine that takes token-id prompts fits: vLLM in-process
(``vllm_client``), any OpenAI-compatible ``/v1/completions`` server (``openai_client``) and this project's own
transformers decoder (``transformers_client``), which the tests hold to ``parallel_decode`` / ``normal_decode``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..engine.batch import request_seed

STOP = "stop"  # a stop token (EOS, or one of the request's stop ids) ended the completion; it is its last id
LENGTH = "length"  # the completion wrote max_tokens


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens: greedy when ``do_sample`` is False (the other settings are then unused)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int | None = None  # the request's own random stream (None: the engine's)


@dataclass(frozen=True)
class CompletionRequest:
    """``banned_token_ids``: ids the completion may not write (the skeleton processor's masks, which the method
    asks for on a one-token request). A client that cannot mask sends them as a logit bias of ``BAN_BIAS``."""

    prompt_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int]
    sampling: Sampling
    banned_token_ids: frozenset[int] = frozenset()


# The lowest logit bias OpenAI's API admits (vLLM clamps its SamplingParams to it as well): no two logits of a model
# lie 100 apart, so under it a banned token is never the argmax.
BAN_BIAS = -100.0


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated ids; ends with the stop token when one ended it
    finish: str  # STOP or LENGTH


TokenCallback = Callable[[list[int]], None]


class CompletionClient(Protocol):
    """An engine that completes token-id prompts, many at once.

    ``name`` is what the results' ``normal_attention`` / ``parallel_attention`` columns record. ``stop_token_ids``
    (the model's EOS ids) and ``context_length`` (the longest prompt plus completion the engine takes; None where
    it is not known) are facts of the model the client serves, which the method needs for the answer's budget.
    """

    name: str
    stop_token_ids: frozenset[int]
    context_length: int | None

    async def complete(self, request: CompletionRequest, on_tokens: TokenCallback | None = None) -> Completion:
        """Complete one request; ``on_tokens``, when given, receives newly generated ids as they come."""
        ...

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix, so the next request prefills its whole prompt."""
        ...

    async def aclose(self) -> None: ...


def stage_seed(seed: int | None, *place: int) -> int | None:
    """The seed of one request of an answer from the run's ``seed`` and the request's place in the answer (e.g.
    block, stage, branch), so a sampled run with a seed reproduces whatever the order requests complete in."""
    if seed is None:
        return None
    for index in place:
        seed = request_seed(seed, index)
    return seed


def check_request(request: CompletionRequest) -> None:
    if not request.prompt_ids:
        raise ValueError("a completion request needs a non-empty prompt")
    if request.max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
