"""A :class:`~parallel_decoding.completions.interface.CompletionClient` on the project's own transformers decoder.

Each request is decoded alone, prefill then one token at a time, with the engine's loop
(``engine.sequential.decode_sequential``) and sampler, on the eager reference decoder. It is the reference the
stage-level method is tested against in every CI leg, without vLLM: its answers equal ``parallel_decode`` /
``normal_decode``. Requests run one after another, each to its end, in the calling thread. The decoder's cache is
kept from one request to the next and cut back to the prompt's longest cached prefix (a prefix cache of one entry,
which is what the method's requests share: the answer so far).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import torch

from ..decoding.eager import EagerDecoder
from ..decoding.hf import check_model, context_length
from ..decoding.regions import PassRequest
from ..engine.decode import GenerationConfig, stop_token_ids
from ..engine.scheduler import Slots, drive, slots_of
from ..engine.sequential import ProcessorChain, Sequence, decode_sequential, forward_next
from .interface import LENGTH, STOP, Completion, CompletionRequest, Sampling, TokenCallback, check_request


class TransformersClient:
    """Completions on a loaded Hugging Face causal LM (``model``, ``tokenizer``)."""

    name = "transformers"

    def __init__(self, model, tokenizer):
        check_model(model)
        self.model = model
        self.decoder = EagerDecoder(model)
        self.cached: list[int] = []  # the tokens whose keys and values the decoder's cache holds
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self.context_length: int | None = context_length(model)

    async def complete(self, request: CompletionRequest, on_tokens: TokenCallback | None = None) -> Completion:
        check_request(request)
        if self.context_length is not None and len(request.prompt_ids) + request.max_tokens > self.context_length:
            raise ValueError(
                f"a prompt of {len(request.prompt_ids)} tokens and {request.max_tokens} new tokens exceed the "
                f"model's context ({self.context_length})"
            )
        seq = Sequence(request.prompt_ids, len(request.prompt_ids) + request.max_tokens)
        reused = self._reuse_prefix(request.prompt_ids)
        self.cached = []  # unknown until the request ends (an error may leave the cache anywhere)
        with torch.inference_mode():
            stop = drive(self._steps(slots_of(self.decoder), seq, request, reused, on_tokens), self.decoder)
        # The cache holds every token of the request but the last, whose logits were never needed.
        self.cached = seq.buffer[0, : self.decoder.length].tolist()
        return Completion(seq.answer, STOP if stop == "block_end" else LENGTH)

    def _reuse_prefix(self, prompt_ids: list[int]) -> int:
        """Cut the cache back to the longest prefix it shares with the prompt (at least the prompt's last token is
        left to prefill, for its logits); returns the prompt tokens cached."""
        common = 0
        for cached, token in zip(self.cached, prompt_ids):
            if cached != token:
                break
            common += 1
        reused = min(common, len(prompt_ids) - 1)
        if reused == 0:
            self.decoder.reset()
        else:
            self.decoder.crop(reused)
        return reused

    def _steps(
        self, slots: Slots, seq: Sequence, request: CompletionRequest, reused: int, on_tokens: TokenCallback | None
    ) -> Generator[PassRequest, Any, str]:
        """The request's state machine: its prompt's prefill, then tokens until a stop token (kept, as a serving
        engine returns it: ``decode_sequential``'s ``block_end`` hook ends on it) or ``max_tokens``."""
        config = self._config(request.max_tokens, request.sampling)
        processor = self._processor(request)
        logits, next_token = yield from forward_next(slots, seq, request.prompt_ids[reused:], config, processor)
        on_step = None if on_tokens is None else _streamer(seq, on_tokens)

        stops = request.stop_token_ids
        return (
            yield from decode_sequential(
                slots,
                seq,
                logits,
                request.max_tokens,
                config,
                frozenset(),
                processor=processor,
                block_end=lambda previous, token: token in stops,
                next_token=next_token,
                on_step=on_step,
            )
        )

    def _processor(self, request: CompletionRequest) -> ProcessorChain | None:
        """The request's banned ids first, where the engine applies the skeleton processor, then ``processor_for``."""
        chain = self.processor_for(request)
        if not request.banned_token_ids:
            return chain
        return ProcessorChain(chain.processors if chain else [], BannedTokens(request.banned_token_ids))

    def processor_for(self, request: CompletionRequest) -> ProcessorChain | None:
        """The logits processors of ``request``'s decoding: none (a serving engine's request has none); a subclass
        may give some, as the tests do to script what a random-weight model writes."""
        return None

    def _config(self, max_tokens: int, sampling: Sampling) -> GenerationConfig:
        generator = None
        if sampling.do_sample and sampling.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(sampling.seed)
        return GenerationConfig(
            max_tokens, sampling.do_sample, sampling.temperature, sampling.top_p, sampling.top_k, generator
        )

    async def reset_prefix_cache(self) -> None:
        self.decoder.reset()
        self.cached = []

    async def aclose(self) -> None:
        """Nothing to release: the model belongs to the caller."""


class BannedTokens:
    """Scores of -inf for ``ids`` at every step, as the skeleton processor masks them (the skeleton's place in a
    ``ProcessorChain``)."""

    def __init__(self, ids: frozenset[int]):
        self.index = torch.tensor(sorted(ids), dtype=torch.long)  # (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        index = self.index[self.index < scores.shape[-1]].to(scores.device)  # (B',) the ids within the vocab
        return scores.index_fill(-1, index, float("-inf"))  # (1, V)

    def leaves_scores_unchanged(self, input_ids: torch.Tensor) -> bool:
        return False


def _streamer(seq: Sequence, on_tokens: TokenCallback) -> Callable[[], None]:
    """An ``on_step`` for ``decode_sequential`` that hands ``on_tokens`` the tokens appended since its last call."""
    sent = 0

    def on_step() -> None:
        nonlocal sent
        answer = seq.answer
        on_tokens(answer[sent:])
        sent = len(answer)

    return on_step
