"""Logits to tokens: one sampler for normal decoding and every parallel stage, so both modes decode alike."""

from __future__ import annotations

import hashlib

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def stream_seed(*parts: int | str) -> int:
    """The seed of one random stream, named by ``parts`` (e.g. a run's seed and a request's index): the first 8
    bytes (little-endian) of SHA-256 of the parts joined by ``:``, cut to 63 bits. Stable across processes,
    machines and Python versions (unlike ``hash``), so a stream samples alike wherever it is decoded."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class Sampler:
    """Turns logits (N, V) into tokens (N,): argmax, or temperature / top-k / top-p sampling.

    The same sampler serves normal decoding and every parallel stage, so both modes decode under one setting.
    ``generator`` (a :class:`torch.Generator` on the logits' device) is the random stream every draw comes from;
    None draws from torch's global stream.
    """

    def __init__(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.do_sample = do_sample
        self.generator = generator
        warpers: list[LogitsProcessor] = []
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = self.warpers(None, logits)  # type: ignore[arg-type]  # the warpers read the scores alone
        probs = torch.softmax(scores, dim=-1)  # (N, V)
        return torch.multinomial(probs, num_samples=1, generator=self.generator)[:, 0]  # (N,)


greedy = Sampler()
