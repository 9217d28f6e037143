"""A synthetic request for the batch engine, for random-weight models of a real shape (which write no ``####`` block).

A random-weight model never writes the skeleton, so its parallel answers would all fall back to sequential text.
This request takes the method's passes in their real order and sizes instead, set by hand: the prompt's prefill;
in parallel mode a skeleton of ``skeleton_tokens`` one-token steps, then ``branches`` branches of one title token
and ``branch_tokens`` tokens decoded together after the prompt (``engine.branches.decode_branches_cached``, the
stage the real answer runs), the joined branches prefilled in their place, and ``conclusion_tokens`` steps of
sequential text; in normal mode the same answer length, one token per pass. Both modes write the same number of
answer tokens (the skeleton is replaced by the branches, as in a real answer), so tokens/s compare like for like.

It is what the scheduler runs (``slots_needed``, ``what``, ``steps(slots)``, as ``engine.decode.AnswerSpec``);
greedy, no stop token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine.branches import decode_branches_cached


@dataclass(frozen=True)
class SyntheticShape:
    """The sizes of one synthetic answer."""

    skeleton_tokens: int = 16
    branches: int = 4
    branch_tokens: int = 32
    conclusion_tokens: int = 16

    def __post_init__(self):
        if min(self.skeleton_tokens, self.branches, self.branch_tokens, self.conclusion_tokens) < 1:
            raise ValueError(f"every size of a synthetic answer must be >= 1; got {self}")

    @property
    def answer_tokens(self) -> int:
        """Tokens of the final answer, both modes: every branch's title and tokens, then the conclusion."""
        return self.branches * (1 + self.branch_tokens) + self.conclusion_tokens


@dataclass
class SyntheticAnswer:
    """One synthetic request: ``prompt`` token ids, ``parallel`` or normal, of ``shape``; ``titles`` one token per
    branch."""

    prompt: list[int]
    parallel: bool
    shape: SyntheticShape
    titles: list[int]

    @property
    def slots_needed(self) -> int:
        return len(self.prompt) + max(self.shape.skeleton_tokens, self.shape.answer_tokens)

    @property
    def what(self) -> str:
        return f"a synthetic prompt of {len(self.prompt)} tokens and {self.shape.answer_tokens} new tokens"

    def steps(self, slots):
        """The state machine: returns ``{"response": answer token ids, "length", "time"}`` (admission to its end)."""
        start = time.perf_counter()
        first = yield from _next_token(slots, self.prompt)  # the prompt's prefill
        if self.parallel:
            yield from _continue(slots, first, self.shape.skeleton_tokens - 1)  # the skeleton: the branches replace it
            results = yield from decode_branches_cached(
                slots, len(self.prompt), [[title] for title in self.titles], self.shape.branch_tokens
            )
            answer = [t for title, result in zip(self.titles, results) for t in (title, *result.tokens)]
            slots.crop(len(self.prompt))
            first = yield from _next_token(slots, answer)  # the merge: the branches in title order, prefilled
            answer += [first, *(yield from _continue(slots, first, self.shape.conclusion_tokens - 1))]
        else:
            answer = [first, *(yield from _continue(slots, first, self.shape.answer_tokens - 1))]
        return {"response": answer, "length": len(answer), "time": time.perf_counter() - start}


def _next_token(slots, token_ids: list[int]):
    """One pass over ``token_ids``; returns the greedy token after the last."""
    return int((yield from slots.forward(token_ids, greedy=True))[-1])


def _continue(slots, token: int, count: int):
    """``count`` one-token passes, each after the token the last one chose, from ``token``; returns their tokens."""
    tokens = []
    for _ in range(count):
        token = yield from _next_token(slots, [token])
        tokens.append(token)
    return tokens
