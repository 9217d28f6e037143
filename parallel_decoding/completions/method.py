"""Normal and three-stage parallel decoding of one answer as completion requests to a serving engine.

The same answers as ``engine.decode.normal_decode`` / ``parallel_decode``, from ordinary requests (see
``completions.interface``) instead of the project's own decode loop: a branch equals that branch decoded alone from
the shared prefix plus its title, so each stage is a request, the engine's prefix cache shares the prefix's KV and
its continuous batching decodes the branches together. A parallel answer loops over ``####`` blocks:

1. skeleton: one request writes the sequential text up to the block's first ``####``; then one short request per
   title, stopping at the title's colon (or ``%%%%``), after which the client appends the ``......``, newline and
   ``####`` the skeleton processor forces (its jump-forward), until ``####%%%%`` closes the block;
2. branches: each title becomes a request on the prefix plus ``####Title:``, stopping at ``####`` or EOS, all
   submitted at once; they share what is left of the answer's budget exactly as in ``parallel_decode``;
3. merge: the prefix, the branches in title order and ``####%%%%`` are the next request's prompt; a later block
   goes through 1-3 again.

The block rules (markers, titles, caps, the budget split, the parsing of a closed block) are the engine's own
(``engine.skeleton``, ``engine.decode``); the branch stage's shared budget is applied by replaying the branches'
tokens through ``engine.branches.decode_branches_cached``. The skeleton's grammar is followed with the engine's
``SkeletonState``. Its two masks (no ``####`` or ``%%%%`` as the answer's first token, no ``#`` right after a
``####``) only ever bear on a request's first token, since every request of a segment that may open a block stops
at a marker: a request whose first token is one of them is made again for that one token with those ids banned
(``CompletionRequest.banned_token_ids``), and the segment goes on from there. Requests whose first token is
allowed, nearly all of them, cost nothing more.

``steps`` in the results is the number of engine requests the answer made (on this path a request, not a forward
pass, is the unit of work).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.branches import BranchResult, decode_branches_cached
from ..engine.decode import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_BLOCKS,
    MAX_BRANCHES,
    NO_BLOCK_FALLBACK,
    UNCLOSED_FALLBACK,
    AnswerCaps,
    BranchLimits,
    CapKind,
    GenerationConfig,
    answer_budget,
    blocks_cap,
    branch_cap,
    branch_share,
    cut_branches,
    marker_vocab,
    normal_ended,
    settle_branch_stops,
)
from ..engine.scheduler import drive, slots_of
from ..engine.skeleton import (
    MarkerVocab,
    SkeletonBlock,
    SkeletonState,
    branch_title,
    first_branch_marker,
    parse_skeleton,
)
from ..engine.timing import StageTimer
from .interface import CompletionClient, CompletionRequest, Sampling, TokenCallback, stage_seed

# The places of an answer's requests, for their seeds (see interface.stage_seed).
SEQUENTIAL_PLACE = 0
BRANCH_PLACE = 1


@dataclass(frozen=True)
class Generation:
    """The decoding settings of one answer: ``engine.decode.GenerationConfig``'s, with a seed instead of a
    generator (each request gets its own seed, derived from this one and the request's place in the answer)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:  # the engine's checks, with its messages
        GenerationConfig(self.max_new_tokens, self.do_sample, self.temperature, self.top_p, self.top_k)

    @classmethod
    def of(cls, gen: Generation | dict[str, Any]) -> Generation:
        if isinstance(gen, Generation):
            return gen
        unknown = set(gen) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
        return cls(**gen)

    def sampling(self, *place: int) -> Sampling:
        return Sampling(self.do_sample, self.temperature, self.top_p, self.top_k, stage_seed(self.seed, *place))


class OrderedStream:
    """Answer tokens handed to ``on_tokens`` once each, in the order the final answer reads (as
    ``engine.stream.AnswerStream`` does for the engine): ``settle(tokens)`` says that ``tokens`` begin the final
    answer, and what is new of them, up to ``hold`` (a ``####`` that may still open a block), is sent."""

    def __init__(self, on_tokens: TokenCallback):
        self.on_tokens = on_tokens
        self.sent = 0
        self.hold: int | None = None

    def settle(self, tokens: list[int]) -> None:
        end = len(tokens) if self.hold is None else min(self.hold, len(tokens))
        if end > self.sent:
            new = tokens[self.sent : end]
            self.sent = end
            self.on_tokens(new)


def _before_stop(tokens: list[int], stops: frozenset[int]) -> list[int]:
    """``tokens`` up to (without) the first stop token: what of a completion in progress belongs to the answer."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


@dataclass
class _Answer:
    """One answer in progress: the client, the settings, the answer's tokens so far and the requests made."""

    client: CompletionClient
    prompt_ids: list[int]
    gen: Generation
    budget: int
    stream: OrderedStream | None
    answer: list[int] = field(default_factory=list)
    requests: int = 0
    sequential_requests: int = 0

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.client.stop_token_ids

    async def complete(
        self,
        prompt: list[int],
        max_tokens: int,
        stops: frozenset[int],
        sampling: Sampling,
        live: TokenCallback | None,
        banned: frozenset[int] = frozenset(),
    ) -> list[int]:
        """One request; returns its tokens, the stop token (always the last) included when one ended it. Whether
        one did is read from the tokens, not from ``finish``: an engine may call a completion that wrote its stop
        token as its last allowed one either way."""
        self.requests += 1
        request = CompletionRequest(prompt, max_tokens, stops, sampling, banned)
        completion = await self.client.complete(request, live)
        if not completion.token_ids:
            raise RuntimeError(f"{self.client.name}: a completion request returned no tokens")
        return completion.token_ids

    async def sequential(
        self, max_tokens: int, stops: frozenset[int], banned: frozenset[int] = frozenset()
    ) -> list[int]:
        """A request that continues the answer (stage 1 or 3), its tokens streamed live as they come; ``banned``:
        ids it may not write."""
        sampling = self.gen.sampling(SEQUENTIAL_PLACE, self.sequential_requests)
        self.sequential_requests += 1
        live = None
        if self.stream is not None:
            stream, before, pending = self.stream, list(self.answer), []

            def live(chunk: list[int]) -> None:
                pending.extend(chunk)
                stream.settle(before + _before_stop(pending, stops))

        return await self.complete(self.prompt_ids + self.answer, max_tokens, stops, sampling, live, banned)

    def settle(self) -> None:
        if self.stream is not None:
            self.stream.settle(self.answer)

    def finish_stream(self) -> None:
        if self.stream is not None:
            self.stream.hold = None
            self.stream.settle(self.answer)


def _budget(client: CompletionClient, prompt_ids: list[int], gen: Generation) -> int:
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if client.context_length is None:
        return gen.max_new_tokens
    return answer_budget(gen.max_new_tokens, len(prompt_ids), client.context_length)


async def normal_generate(
    client: CompletionClient,
    tokenizer,
    prompt_ids: list[int],
    gen: Generation | dict[str, Any],
    on_tokens: TokenCallback | None = None,
) -> dict:
    """Sequential decoding of the answer to ``prompt_ids`` (``engine.decode.chat_prompt_ids``) in one request;
    the result has ``normal_decode``'s keys. ``on_tokens`` receives the answer's ids as they come."""
    gen = Generation.of(gen)
    budget = _budget(client, prompt_ids, gen)
    run = _Answer(client, prompt_ids, gen, budget, None if on_tokens is None else OrderedStream(on_tokens))
    timer = StageTimer()
    tokens = await run.sequential(budget, client.stop_token_ids)
    stopped = tokens[-1] in client.stop_token_ids
    run.answer = tokens[:-1] if stopped else tokens
    timer.lap("decode")
    run.finish_stream()
    return {
        "response": tokenizer.decode(run.answer, skip_special_tokens=True),
        "time": timer.get("decode"),
        "length": len(run.answer),
        "prompt_tokens": len(prompt_ids),
        **normal_ended(not stopped, gen.max_new_tokens, budget).fields(),
        "steps": run.requests,
    }


# --- parallel decoding, one function per stage -----------------------------------------------------------------------


@dataclass
class _ParallelAnswer(_Answer):
    """A parallel answer's state, as ``engine.decode.ParallelAnswer`` keeps it for the engine."""

    markers: MarkerVocab | None = None
    limits: BranchLimits = field(default_factory=BranchLimits)
    skeleton: SkeletonState | None = None  # the skeleton grammar over the prompt and the answer
    timer: StageTimer = field(default_factory=StageTimer)
    skeletons: list[list[int]] = field(default_factory=list)  # per block, the segment that wrote its skeleton
    branches: list[dict] = field(default_factory=list)  # {"block", "stop", "prefix", "tokens"} per branch
    ended: AnswerCaps = field(default_factory=AnswerCaps)  # the caps it hit and why it stopped
    fallback: str | None = None
    blocks: int = 0  # blocks decoded in parallel so far
    block_search_from: int = 0  # answer index after the last merged block: where the next block is looked for

    @property
    def vocab(self) -> MarkerVocab:
        assert self.markers is not None
        return self.markers

    def grammar(self) -> SkeletonState:
        """The skeleton grammar, brought up to the answer so far."""
        assert self.skeleton is not None
        self.skeleton.update(self.prompt_ids + self.answer)
        return self.skeleton


async def parallel_generate(
    client: CompletionClient,
    tokenizer,
    prompt_ids: list[int],
    gen: Generation | dict[str, Any],
    max_branches: int = MAX_BRANCHES,
    max_blocks: int = MAX_BLOCKS,
    max_branch_tokens: int | None = None,
    on_tokens: TokenCallback | None = None,
) -> dict:
    """Three-stage parallel decoding of the answer to ``prompt_ids`` as requests to ``client``; the settings, caps
    and result keys of ``engine.decode.parallel_decode``. ``on_tokens`` receives the answer's ids in the order the
    final answer reads: sequential text live, in a block the first branch live and each later one once those
    before it are done."""
    gen = Generation.of(gen)
    markers = marker_vocab(tokenizer)
    run = _ParallelAnswer(
        client,
        prompt_ids,
        gen,
        _budget(client, prompt_ids, gen),
        None if on_tokens is None else OrderedStream(on_tokens),
        markers=markers,
        limits=BranchLimits(max_branches, max_blocks, max_branch_tokens),
        skeleton=SkeletonState(markers, len(prompt_ids)),
    )
    run.timer = StageTimer()
    while len(run.answer) < run.budget and await _decode_round(run):
        pass
    run.finish_stream()
    return _parallel_result(run, tokenizer)


async def _decode_round(run: _ParallelAnswer) -> bool:
    """A sequential segment and, when it closed a block, the block's branches and their merge. Returns whether the
    answer goes on."""
    segment_start = len(run.answer)
    parallel = run.blocks < run.limits.max_blocks
    stop = await _sequential_segment(run, parallel)
    # A sequential segment is stage 1 when it wrote a skeleton (or came before any block), else stage 3.
    stage = "stage1" if stop == "block_end" or run.blocks == 0 else "stage3"
    if stop != "block_end":
        if parallel:
            stop = await _fall_back_if_open(run, stop)
        run.timer.lap(stage)
        if stop == "budget":
            run.ended.budget_reached(run.gen.max_new_tokens, run.budget)
        return False
    run.timer.lap(stage)
    run.skeletons.append(run.answer[segment_start:])
    block, block_start = _closed_block(run)
    merged, budget_hit = await _decode_block_branches(run, block, block_start)
    return _merge_block(run, block, block_start, merged, budget_hit)


async def _sequential_segment(run: _ParallelAnswer, parallel: bool) -> str:
    """Stage 1 (or 3): requests until a block closes, an EOS or the budget; returns ``"block_end"``, ``"eos"`` or
    ``"budget"``, as ``engine.sequential.decode_sequential`` does. In a segment that may open a block, each request
    stops where the skeleton grammar takes a hand: at a ``####`` (a title begins), in a title at its colon (the
    forced ``......``, newline and ``####`` are appended here, as the engine's jump-forward does) and at ``%%%%``
    (which closes the block right after a ``####``)."""
    markers = run.vocab
    while len(run.answer) < run.budget:
        stops, banned = run.stop_ids, frozenset[int]()
        if parallel:
            grammar = run.grammar()
            if _append_forced(run, grammar):  # a merged block can leave the grammar inside a title's forced end
                run.settle()
                continue
            title_end = markers.colon_ids if grammar.in_title else frozenset()
            stops = stops | markers.branch_ids | markers.block_end_ids | title_end
            banned = grammar.banned_ids()
        tokens = await run.sequential(run.budget - len(run.answer), stops)
        if tokens[0] in banned:  # the processor's mask: its first token again, from the tokens it allows
            tokens = await run.sequential(1, stops, banned)
        if tokens[-1] in run.stop_ids:  # an EOS ends the answer and is not part of it
            run.answer += tokens[:-1]
            return "eos"
        previous = (run.prompt_ids + run.answer + tokens)[-2]
        run.answer += tokens
        if parallel:
            if markers.is_block_end(previous, tokens[-1]):
                return "block_end"
            _append_forced(run, run.grammar())
            if run.stream is not None:  # nothing from a '####' that may open a block is settled
                run.stream.hold = first_branch_marker(run.answer, run.block_search_from, markers)
        run.settle()
    return "budget"


def _append_forced(run: _ParallelAnswer, grammar: SkeletonState) -> bool:
    """Append what the skeleton forces here (after a title's colon), within the budget; returns whether it did."""
    forced = list(grammar.forced_tokens())[: run.budget - len(run.answer)]
    run.answer += forced
    return bool(forced)


async def _fall_back_if_open(run: _ParallelAnswer, stop: str) -> str:
    """The engine's fallback when the answer ended inside a ``####`` block that never closed: back to where it
    opened, and the rest written sequentially in one request. Returns why the answer stopped."""
    open_block = first_branch_marker(run.answer, run.block_search_from, run.vocab)
    if open_block is None:
        return stop
    run.fallback = UNCLOSED_FALLBACK
    del run.answer[open_block:]
    if run.stream is not None:
        run.stream.hold = None
    tokens = await run.sequential(run.budget - open_block, run.stop_ids)
    if tokens[-1] in run.stop_ids:
        run.answer += tokens[:-1]
        return "eos"
    run.answer += tokens
    return "budget"


def _closed_block(run: _ParallelAnswer) -> tuple[SkeletonBlock, int]:
    """The block the segment closed, its branches cut to ``max_branches``, and the answer index of its first
    ``####``."""
    block = parse_skeleton(run.answer[run.block_search_from :], run.vocab)
    if block is None:  # cannot happen: the segment ended on '####' '%%%%', which always parses as a closing
        raise RuntimeError("the skeleton's closing marker was seen but could not be parsed")
    cap = cut_branches(block, run.limits.max_branches, run.blocks)
    if cap is not None:
        run.ended.cap(CapKind.MAX_BRANCHES, cap)
    return block, run.block_search_from + block.start


async def _decode_block_branches(
    run: _ParallelAnswer, block: SkeletonBlock, block_start: int
) -> tuple[list[int], bool]:
    """Stage 2: one request per branch, all at once, within what is left of the budget. Returns the merged tokens
    (each title and its branch, in title order) and whether the branches used up the budget."""
    room, per_branch = branch_share(run.budget, block_start, block, run.limits.max_branch_tokens)
    prefixes = block.branch_prefixes
    if not prefixes:
        return [], False
    if room >= len(prefixes):  # else not even one step of all branches fits
        results = await _branch_requests(run, prefixes, block_start, per_branch, room)
    else:
        results = [BranchResult(tokens=[], stop="budget") for _ in prefixes]
    budget_hit = settle_branch_stops(results, per_branch, room)
    merged: list[int] = []
    for prefix, result in zip(prefixes, results):
        merged += prefix + result.tokens
        run.branches.append({"block": run.blocks, "stop": result.stop, "prefix": prefix, "tokens": result.tokens})
    if budget_hit:
        run.ended.branch_budget_reached(run.blocks, run.budget, room)
    run.timer.lap("stage2")
    return merged, budget_hit


async def _branch_requests(
    run: _ParallelAnswer, prefixes: list[list[int]], block_start: int, per_branch: int, room: int
) -> list[BranchResult]:
    """Every branch as its own request on the prefix plus its title, submitted at once, then the engine's branch
    stage replayed over their tokens (:class:`ReplayedBranches`): it stops the branches where
    ``decode_branches_cached`` would, had it decoded them in one sequence within ``room`` tokens."""
    stops = run.stop_ids | run.vocab.branch_ids
    shared = run.prompt_ids + run.answer[:block_start]
    stream = _BranchStream(run, block_start, prefixes, stops) if run.stream is not None else None
    # Streamed live only where the shared budget cannot cut a branch short after its tokens were sent (a branch
    # cannot then write past what is left of the answer's budget, see decode_branches_cached).
    live = stream is not None and room >= len(prefixes) * per_branch

    async def branch(b: int) -> list[int]:
        on_tokens = stream.on_tokens(b) if stream is not None and live else None
        tokens = await run.complete(
            shared + prefixes[b], per_branch, stops, run.gen.sampling(BRANCH_PLACE, run.blocks, b), on_tokens
        )
        if stream is not None and live:
            stream.finished(b)
        return tokens

    outputs = await asyncio.gather(*(branch(b) for b in range(len(prefixes))))
    replay = ReplayedBranches(outputs)
    steps = decode_branches_cached(
        slots_of(replay), len(shared), prefixes, per_branch, stop_token_ids=stops, max_total_tokens=room
    )
    return drive(steps, replay)


class ReplayedBranches:
    """A decoder, as ``engine.branches.decode_branches_cached`` drives one, whose passes hand back the tokens each
    branch's own request wrote. A branch's tokens do not depend on the other branches, so the engine's stage run
    over them stops every branch exactly where it would have stopped in one sequence (the shared budget included)."""

    def __init__(self, outputs: list[list[int]]):
        self.outputs = outputs
        self.taken = [0] * len(outputs)
        self.steps = 0

    @property
    def length(self) -> int:
        return 0

    def crop(self, length: int) -> None:
        pass  # nothing is cached: the requests' own engine holds their keys and values

    def reserve(self, tokens: int, what: str) -> None:
        pass  # likewise: the requests were already answered, so the room they needed was found

    def reset(self) -> None:
        pass

    def forward(self, token_ids, positions=None, branch_ids=None, keep=None, greedy: bool = False) -> torch.Tensor:
        rows = branch_ids if keep == "all" else [branch_ids[k] for k in keep]  # the tree prefill keeps one row each
        tokens = []
        for b in rows:
            if self.taken[b] >= len(self.outputs[b]):
                raise RuntimeError(f"branch {b}'s request ended before its stop token or its token cap")
            tokens.append(self.outputs[b][self.taken[b]])
            self.taken[b] += 1
        self.steps += 1
        return torch.tensor(tokens, dtype=torch.long)  # (rows,)


class _BranchStream:
    """Streams a block's branches in title order: the text before the block, the first branch live, each later
    one once every branch before it is done (``engine.stream.AnswerStream.branches``)."""

    def __init__(self, run: _ParallelAnswer, block_start: int, prefixes: list[list[int]], stops: frozenset[int]):
        assert run.stream is not None
        self.stream = run.stream
        self.before = run.answer[:block_start]
        self.prefixes = prefixes
        self.stops = stops
        self.outputs: list[list[int]] = [[] for _ in prefixes]
        self.done = [False] * len(prefixes)
        self.stream.hold = None

    def on_tokens(self, b: int) -> TokenCallback:
        def take(chunk: list[int]) -> None:
            self.outputs[b].extend(chunk)
            self.settle()

        return take

    def finished(self, b: int) -> None:
        self.done[b] = True
        self.settle()

    def settle(self) -> None:
        tail: list[int] = []
        for prefix, tokens, done in zip(self.prefixes, self.outputs, self.done):
            tail += prefix + _before_stop(tokens, self.stops)
            if not done:
                break
        self.stream.settle(self.before + tail)


def _merge_block(
    run: _ParallelAnswer, block: SkeletonBlock, block_start: int, merged: list[int], budget_hit: bool
) -> bool:
    """Stage 3: the branches in title order and the closing marker replace the skeleton; the next request's prompt
    holds them. Returns whether the answer goes on."""
    run.blocks += 1
    if run.blocks == run.limits.max_blocks:
        run.ended.cap(CapKind.MAX_BLOCKS, blocks_cap(run.limits.max_blocks))
    merged = merged + block.closing
    run.answer[block_start:] = merged
    assert run.skeleton is not None
    run.skeleton.reset()
    run.block_search_from = block_start + len(merged)
    if run.stream is not None:
        run.stream.hold = None
    run.settle()
    if budget_hit or len(run.answer) >= run.budget:
        if not budget_hit:
            run.ended.budget_reached(run.gen.max_new_tokens, run.budget)
        run.timer.lap("stage3")
        return False
    run.timer.lap("stage3")
    return True


def _parallel_result(run: _ParallelAnswer, tokenizer) -> dict:
    """The result of a parallel answer, with ``parallel_decode``'s keys; text is made after the timer."""
    for branch in run.branches:
        branch["title"] = branch_title(branch.pop("prefix"), tokenizer)
        tokens = branch.pop("tokens")
        branch["text"] = tokenizer.decode(tokens, skip_special_tokens=True)
        branch["tokens"] = len(tokens)
        if branch["stop"] == "cap":
            run.ended.cap(
                CapKind.BRANCH_TOKENS, branch_cap(branch["block"], branch["title"], run.limits.max_branch_tokens)
            )
    if not run.branches and run.fallback is None:
        run.fallback = NO_BLOCK_FALLBACK
    timer = run.timer
    return {
        "response": tokenizer.decode(run.answer, skip_special_tokens=True),
        "time": timer.total,
        "length": len(run.answer),
        "prompt_tokens": len(run.prompt_ids),
        "num_branches": len(run.branches),
        "num_blocks": run.blocks,
        "stage1_response": "\n".join(tokenizer.decode(s, skip_special_tokens=True) for s in run.skeletons),
        "branches": run.branches,
        "stage1_time": timer.get("stage1"),
        "stage2_time": timer.get("stage2"),
        "stage3_time": timer.get("stage3"),
        "fallback": run.fallback,
        **run.ended.fields(),
        "steps": run.requests,
    }
