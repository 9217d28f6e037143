"""Normal decoding and three-stage parallel decoding of one answer, on a stock Hugging Face causal LM.

Both modes share one prefill, one decode loop (``sequential``) and one sampler (``sampling``), so the comparison between them
measures the method and nothing else. A parallel run loops over ``####`` blocks:

1. skeleton: sequential decoding with :class:`SkeletonLogitsProcessor` until the block's ``####%%%%``;
2. branches: the cache is cut back to the text before the block's first ``####`` and every title is decoded
   as a branch in one sequence (:func:`decode_branches_cached`);
3. merge: the branches, in title order, and the closing ``####%%%%`` are prefilled on top of the cached prefix
   and sequential decoding goes on with the processor still active, so a later block runs 1-3 again.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from ..decoding.hf import check_model, context_length
from ..decoding.select import decoder_for
from .branches import BranchResult, decode_branches_cached
from .scheduler import Scheduler, SoloBackend, run_one
from .sampling import Sampler
from .sequential import ProcessorChain, Sequence, decode_sequential, forward_next, processor_chain
from .stream import AnswerStream
from .skeleton import MarkerVocab, SkeletonBlock, SkeletonLogitsProcessor, branch_title, parse_skeleton
from .timing import StageTimer

DEFAULT_MAX_NEW_TOKENS = 512
MAX_BRANCHES = 64  # branches beyond this many in one block are dropped (and the result says so)
MAX_BLOCKS = 8  # '####' blocks decoded in parallel per answer; later ones are decoded sequentially


@dataclass
class GenerationConfig:
    """The decoding settings shared by normal decoding and every parallel stage."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None  # the random stream of this run (None: torch's global one)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.sampler = Sampler(self.do_sample, self.temperature, self.top_p, self.top_k, self.generator)


def _generation_config(gen: dict) -> GenerationConfig:
    unknown = set(gen) - {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "generator"}
    if unknown:
        raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
    return GenerationConfig(**gen)


def chat_prompt_ids(tokenizer, prompt) -> list[int]:
    """The prompt wrapped in the tokenizer's chat template: ``prompt`` is the user message (what generate.py sends)
    or a list of chat messages (``{"role", "content"}``, as an OpenAI-style client sends them). A tokenizer without
    a template gets the text of a lone user message as it is."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("the prompt must be a string or a non-empty list of {role, content} messages")
    if not any(m["content"].strip() for m in messages):
        raise ValueError("the prompt is empty")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on some releases
            ids = ids["input_ids"]
        return list(ids)
    if len(messages) != 1 or messages[0].get("role", "user") != "user":
        raise ValueError("this tokenizer has no chat template, so the prompt must be one user message")
    return tokenizer.encode(messages[0]["content"], add_special_tokens=True)


def stop_token_ids(model, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config and the tokenizer, plus ``<|im_end|>`` where the vocabulary has one."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


@functools.lru_cache(maxsize=8)
def marker_vocab(tokenizer) -> MarkerVocab:
    return MarkerVocab.from_tokenizer(tokenizer)


def prepare_prompt(model, tokenizer, prompt: str, gen: dict) -> tuple[GenerationConfig, list[int], int]:
    """Check the model and the settings and tokenize the prompt; returns ``(config, prompt_ids, budget)``, the budget
    being the tokens the answer may have: ``max_new_tokens``, or fewer where the model's context ends first."""
    check_model(model)
    config = _generation_config(gen)
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    limit = context_length(model)
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    budget = min(config.max_new_tokens, limit - len(prompt_ids))
    return config, prompt_ids, budget


def solo_scheduler(model, compile) -> Scheduler:
    """A scheduler for one answer on the decoder ``decoding.select.decoder_for`` picks: what ``normal_decode`` and
    ``parallel_decode`` run on (the batch engine, ``engine.batch.Engine``, packs many answers instead)."""
    return Scheduler(SoloBackend(decoder_for(model, compile)))


def _budget_cap(config, budget: int) -> str:
    if budget < config.max_new_tokens:
        return f"the answer reached the model's context ({budget} tokens after the prompt)"
    return f"the answer reached max_new_tokens ({budget})"


@dataclass
class BranchLimits:
    """The caps of parallel decoding (see :func:`parallel_decode`)."""

    max_branches: int = MAX_BRANCHES
    max_blocks: int = MAX_BLOCKS
    max_branch_tokens: int | None = None
    jump_forward: bool = True

    def __post_init__(self):
        if self.max_branches < 1 or self.max_blocks < 0 or (
            self.max_branch_tokens is not None and self.max_branch_tokens < 1
        ):
            raise ValueError(
                f"max_branches and max_branch_tokens must be >= 1 and max_blocks >= 0, "
                f"got {self.max_branches}, {self.max_branch_tokens} and {self.max_blocks}"
            )


@dataclass
class AnswerSpec:
    """One answer to decode, checked: the prompt's ids, the settings and the budget. ``steps(slots)`` is its state
    machine, which the scheduler runs; ``limits`` None means normal decoding."""

    model: object
    tokenizer: object
    prompt_ids: list[int]
    config: GenerationConfig
    budget: int  # tokens the whole answer may have
    logits_processor: list | None = None
    limits: BranchLimits | None = None
    stream: AnswerStream | None = None  # told which answer tokens are settled, as they are

    @classmethod
    def make(cls, model, tokenizer, prompt: str, logits_processor=None, limits=None, stream=None,
             **gen) -> "AnswerSpec":
        config, prompt_ids, budget = prepare_prompt(model, tokenizer, prompt, gen)
        return cls(model, tokenizer, prompt_ids, config, budget, logits_processor, limits, stream)

    @property
    def slots_needed(self) -> int:
        """KV slots the answer can fill: the prompt and the budget (a block's branches replace its skeleton)."""
        return len(self.prompt_ids) + self.budget

    @property
    def what(self) -> str:
        return f"a prompt of {len(self.prompt_ids)} tokens and {self.budget} new tokens"

    def steps(self, slots):
        return normal_steps(self, slots) if self.limits is None else parallel_steps(self, slots)


@torch.inference_mode()
def normal_decode(model, tokenizer, prompt: str, logits_processor=None, compile=False, **gen) -> dict:
    """Sequential decoding of the answer to ``prompt`` (the user message). Greedy unless ``do_sample``.

    ``logits_processor``: optional extra :class:`~transformers.LogitsProcessorList`, applied at every step (its
    ``input_ids`` are on the scores' device).
    ``compile``: False (the eager reference), True, or "auto"/"on"/"off" (see ``decoding.interface.compile_enabled``):
    decode on the model's static KV arena with a compiled step; same tokens.
    """
    spec = AnswerSpec.make(model, tokenizer, prompt, logits_processor, **gen)
    return run_one(solo_scheduler(model, compile), spec)


def normal_steps(spec: AnswerSpec, slots):
    """The state machine of a normal answer: prefill, then one token at a time (see ``engine.scheduler``)."""
    config, prompt_ids, budget = spec.config, spec.prompt_ids, spec.budget
    stop_ids = stop_token_ids(spec.model, spec.tokenizer)
    timer = StageTimer.for_model(spec.model)
    seq = Sequence(prompt_ids, len(prompt_ids) + budget)
    processor = processor_chain(spec.logits_processor)
    logits, next_token = yield from forward_next(slots, seq, prompt_ids, config, processor)  # the prompt's prefill
    stream = spec.stream
    on_step = None if stream is None else (lambda: stream.settle(seq, seq.length - seq.prompt_len))
    stop = yield from decode_sequential(
        slots, seq, logits, budget, config, stop_ids, processor=processor, next_token=next_token, on_step=on_step
    )
    timer.lap("decode")
    if stream is not None:
        stream.finish(seq)
    answer = seq.answer
    return {
        "response": spec.tokenizer.decode(answer, skip_special_tokens=True),
        "time": timer.get("decode"),
        "length": len(answer),
        "prompt_tokens": len(prompt_ids),
        "caps": [_budget_cap(config, budget)] if stop == "budget" else [],
        "steps": slots.steps,
    }


# --- parallel decoding, one function per stage -----------------------------------------------------------------------

UNCLOSED_FALLBACK = "the model opened a #### block but did not close it with ####%%%%; decoded sequentially"
NO_BLOCK_FALLBACK = "the model wrote no ####Title: block; decoded sequentially"


@dataclass
class ParallelRun:
    """What stays fixed while one answer is decoded in parallel: its slots, the settings and the processors."""

    slots: object  # the answer's KV cache (``engine.scheduler.Slots``)
    config: GenerationConfig
    stop_ids: frozenset[int]
    markers: MarkerVocab
    budget: int  # tokens the whole answer may have
    limits: BranchLimits
    skeleton: SkeletonLogitsProcessor
    skeleton_processor: ProcessorChain  # the skeleton, then the user's processors: segments that may open a block
    sequential_processor: ProcessorChain | None  # the user's alone: the fallback and blocks beyond max_blocks
    stream: AnswerStream | None = None

    def segment_processor(self, blocks: int) -> ProcessorChain | None:
        return self.skeleton_processor if blocks < self.limits.max_blocks else self.sequential_processor


@dataclass
class ParallelAnswer:
    """The state of one parallel answer as its blocks are decoded; token ids only, text is made after the timer."""

    timer: StageTimer
    seq: Sequence
    skeletons: list[list[int]] = field(default_factory=list)  # per block, the segment that wrote its skeleton
    branches: list[dict] = field(default_factory=list)  # {"prefix", "tokens", "block", "stop"} per branch
    caps: list[str] = field(default_factory=list)
    fallback: str | None = None
    blocks: int = 0  # blocks decoded in parallel so far
    block_search_from: int = 0  # answer index after the last merged block: where the next block is looked for

    @property
    def written(self) -> int:
        return self.seq.length - self.seq.prompt_len


@torch.inference_mode()
def parallel_decode(
    model,
    tokenizer,
    prompt: str,
    max_branches: int = MAX_BRANCHES,
    max_blocks: int = MAX_BLOCKS,
    max_branch_tokens: int | None = None,
    logits_processor=None,
    compile=False,
    jump_forward: bool = True,
    **gen,
) -> dict:
    """Three-stage parallel decoding of the answer to ``prompt``; same settings as :func:`normal_decode`.

    ``logits_processor`` (optional) applies to the sequential parts (stages 1 and 3), after the skeleton processor;
    branches decode free.

    ``max_new_tokens`` bounds the whole answer, as in normal decoding: titles, branches and closing marker of a
    block count against what is left, the branch stage stops before a step that would overflow it (see
    :func:`decode_branches_cached`) and the answer then ends after the merged block.
    ``max_branches`` caps the branches of one block (the first ones are kept), ``max_blocks`` the blocks decoded in
    parallel, ``max_branch_tokens`` the tokens of one branch; ``caps`` in the result lists every cap that was hit.
    When the model writes no closed ``####`` block the answer is decoded sequentially and ``fallback`` says why.
    Token ids become text only after the timer stops.
    ``compile`` as in :func:`normal_decode`. ``jump_forward=False`` spends one pass on each token the skeleton
    forces (same greedy answer, more passes).
    """
    limits = BranchLimits(max_branches, max_blocks, max_branch_tokens, jump_forward)
    spec = AnswerSpec.make(model, tokenizer, prompt, logits_processor, limits, **gen)
    return run_one(solo_scheduler(model, compile), spec)


def parallel_steps(spec: AnswerSpec, slots):
    """The state machine of a parallel answer: rounds of skeleton, branches and merge (see ``engine.scheduler``)."""
    config, prompt_ids, budget = spec.config, spec.prompt_ids, spec.budget
    markers = marker_vocab(spec.tokenizer)
    skeleton = SkeletonLogitsProcessor(prompt_length=len(prompt_ids), markers=markers)
    run = ParallelRun(
        slots, config, stop_token_ids(spec.model, spec.tokenizer), markers, budget, spec.limits, skeleton,
        skeleton_processor=processor_chain(spec.logits_processor, skeleton=skeleton),
        sequential_processor=processor_chain(spec.logits_processor), stream=spec.stream,
    )
    timer = StageTimer.for_model(spec.model)
    # Room for the whole answer: the budget bounds skeletons, merged blocks and continuation alike.
    answer = ParallelAnswer(timer, Sequence(prompt_ids, len(prompt_ids) + budget))
    step = yield from forward_next(slots, answer.seq, prompt_ids, config, run.segment_processor(0))  # the prefill
    while step is not None and answer.written < budget:
        step = yield from _decode_round(run, answer, step)
    if run.stream is not None:
        run.stream.finish(answer.seq)
    return _parallel_result(run, answer, spec.tokenizer)


def _decode_round(run: ParallelRun, answer: ParallelAnswer, step):
    """A sequential segment from ``step`` (the ``(logits, next_token)`` of :func:`forward_next`) and, when it closed
    a block, the block's branches and their merge. Returns the next step, or None when the answer is done."""
    tokens = yield from _sequential_segment(run, answer, step)
    if tokens is None:
        return None
    block, block_start = _closed_block(run, answer, tokens)
    merged, budget_hit = yield from _decode_block_branches(run, answer, block, block_start)
    return (yield from _merge_block(run, answer, block, block_start, merged, budget_hit))


def _sequential_segment(run: ParallelRun, answer: ParallelAnswer, step) -> list[int] | None:
    """Stage 1 (or 3): sequential decoding until a block closes, an EOS or the budget. Returns the answer's tokens
    when a block closed (its skeleton is kept), else None: the answer ended here, sequentially."""
    parallel = answer.blocks < run.limits.max_blocks
    segment_start = answer.written
    logits, next_token = step
    stop = yield from decode_sequential(
        run.slots, answer.seq, logits, run.budget - answer.written, run.config, run.stop_ids,
        processor=run.segment_processor(answer.blocks),
        block_end=run.markers.is_block_end if parallel else None,
        skeleton=run.skeleton if parallel and run.limits.jump_forward else None,
        next_token=next_token, on_step=_settle_sequential(run, answer, parallel),
    )
    tokens = answer.seq.answer
    # A sequential segment is stage 1 when it wrote a skeleton (or came before any block), else stage 3.
    stage = "stage1" if stop == "block_end" or answer.blocks == 0 else "stage3"
    if stop != "block_end":
        if parallel:
            stop = yield from _fall_back_if_open(run, answer, tokens, stop)
        answer.timer.lap(stage)
        if stop == "budget":
            answer.caps.append(_budget_cap(run.config, run.budget))
        return None
    answer.timer.lap(stage)
    answer.skeletons.append(tokens[segment_start:])
    return tokens


def _fall_back_if_open(run: ParallelRun, answer: ParallelAnswer, tokens: list[int], stop: str) -> str:
    """The fallback when an answer ended inside a ``####`` block that never closed: a skeleton that never closed
    is titles and ellipses, not an answer, so go back to where it started and let the model write that part
    sequentially, as normal decoding would. Returns why the answer stopped."""
    open_block = _first_branch_marker(tokens, answer.block_search_from, run.markers)
    if open_block is None:
        return stop
    answer.fallback = UNCLOSED_FALLBACK
    logits, next_token = yield from _rewind(run.slots, answer.seq, open_block, run.config, run.sequential_processor)
    return (yield from decode_sequential(
        run.slots, answer.seq, logits, run.budget - open_block, run.config, run.stop_ids,
        processor=run.sequential_processor, next_token=next_token, on_step=_settle_sequential(run, answer, False),
    ))


def _closed_block(run: ParallelRun, answer: ParallelAnswer, tokens: list[int]) -> tuple[SkeletonBlock, int]:
    """The block the segment closed, its branches cut to ``max_branches``, and the answer index of its first
    ``####``."""
    block = parse_skeleton(tokens[answer.block_search_from :], run.markers)
    if block is None:  # cannot happen: block_end fired on '####' '%%%%', which always parses as a closing
        raise RuntimeError("the skeleton's closing marker was seen but could not be parsed")
    max_branches = run.limits.max_branches
    if len(block.branch_prefixes) > max_branches:
        answer.caps.append(
            f"block {answer.blocks}: {len(block.branch_prefixes)} branches, kept the first {max_branches}"
        )
        block.branch_prefixes = block.branch_prefixes[:max_branches]
    return block, answer.block_search_from + block.start


def _decode_block_branches(run: ParallelRun, answer: ParallelAnswer, block: SkeletonBlock, block_start: int):
    """Stage 2: every branch of the block in one sequence, within what is left of the budget. Returns the merged
    tokens (each title and its branch, in title order) and whether the branches used up the budget."""
    # The whole block must fit in what is left of the budget: its titles and closing marker always do (the
    # skeleton held them and more), so the branches share the rest.
    room = run.budget - block_start - sum(len(p) for p in block.branch_prefixes) - len(block.closing)
    if not block.branch_prefixes:
        return [], False
    cap = run.limits.max_branch_tokens
    per_branch = room if cap is None else min(room, cap)
    if room >= len(block.branch_prefixes):  # else not even one step of all branches fits
        results = yield from decode_branches_cached(
            run.slots, answer.seq.prompt_len + block_start, block.branch_prefixes, per_branch,
            stop_token_ids=run.stop_ids | run.markers.branch_ids, sampler=run.config.sampler, max_total_tokens=room,
            on_step=None if run.stream is None else (
                lambda outputs, finished: run.stream.branches(answer.seq, block_start, block.branch_prefixes, outputs,
                                                              finished)),
        )
    else:
        results = [BranchResult(tokens=[], stop="budget") for _ in block.branch_prefixes]
    merged: list[int] = []
    for prefix, result in zip(block.branch_prefixes, results):
        if result.stop == "cap" and per_branch == room:  # its cap was what was left of the budget
            result.stop = "budget"
        merged += prefix + result.tokens
        answer.branches.append({"prefix": prefix, "tokens": result.tokens, "block": answer.blocks, "stop": result.stop})
    used = sum(len(r.tokens) for r in results)
    budget_hit = used == room or any(r.stop == "budget" for r in results)
    if budget_hit:
        answer.caps.append(
            f"block {answer.blocks}: the branches used the answer's budget ({run.budget} tokens in all, "
            f"{room} left for branches); the branch stage stopped and the answer ends after the block"
        )
    answer.timer.lap("stage2")
    return merged, budget_hit


def _merge_block(
    run: ParallelRun, answer: ParallelAnswer, block: SkeletonBlock, block_start: int, merged: list[int],
    budget_hit: bool,
):
    """Stage 3: the branches in title order and the closing marker replace the skeleton and are prefilled on top of
    the cached prefix. Returns the next step (see :func:`forward_next`), or None when the answer is done."""
    answer.blocks += 1
    if answer.blocks == run.limits.max_blocks:
        answer.caps.append(f"{run.limits.max_blocks} blocks decoded in parallel; later blocks are decoded sequentially")
    merged = merged + block.closing
    seq = answer.seq
    seq.truncate(block_start)
    seq.extend(merged)
    run.skeleton.state.reset()
    run.slots.crop(seq.prompt_len + block_start)
    answer.block_search_from = block_start + len(merged)
    if run.stream is not None:
        run.stream.merged(answer.block_search_from)
    if budget_hit or answer.written >= run.budget:
        if not budget_hit:
            answer.caps.append(_budget_cap(run.config, run.budget))
        answer.timer.lap("stage3")
        return None
    step = yield from forward_next(run.slots, seq, merged, run.config, run.segment_processor(answer.blocks))
    answer.timer.lap("stage3")
    return step


def _parallel_result(run: ParallelRun, answer: ParallelAnswer, tokenizer) -> dict:
    """The result of a parallel answer; the string work (skeleton, branch and answer text) comes after the timer."""
    for branch in answer.branches:
        branch["title"] = branch_title(branch.pop("prefix"), tokenizer)
        tokens = branch.pop("tokens")
        branch["text"] = tokenizer.decode(tokens, skip_special_tokens=True)
        branch["tokens"] = len(tokens)
        if branch["stop"] == "cap":
            answer.caps.append(
                f"block {branch['block']}: branch {branch['title']!r} reached its token cap ({run.limits.max_branch_tokens})"
            )
    if not answer.branches and answer.fallback is None:
        answer.fallback = NO_BLOCK_FALLBACK
    tokens, timer = answer.seq.answer, answer.timer
    return {
        "response": tokenizer.decode(tokens, skip_special_tokens=True),
        "time": timer.total,
        "length": len(tokens),
        "prompt_tokens": answer.seq.prompt_len,
        "num_branches": len(answer.branches),
        "num_blocks": answer.blocks,
        "stage1_response": "\n".join(tokenizer.decode(s, skip_special_tokens=True) for s in answer.skeletons),
        "branches": answer.branches,
        "stage1_time": timer.get("stage1"),
        "stage2_time": timer.get("stage2"),
        "stage3_time": timer.get("stage3"),
        "fallback": answer.fallback,
        "caps": answer.caps,
        "steps": run.slots.steps,
    }


def _settle_sequential(run: ParallelRun, answer: ParallelAnswer, parallel: bool):
    """The ``on_step`` of a sequential segment when the answer streams: text is settled up to a ``####`` that may
    open a block (in a segment that may open one)."""
    if run.stream is None:
        return None
    return lambda: run.stream.sequential(answer.seq, answer.block_search_from if parallel else None,
                                         run.markers.is_branch)


def _first_branch_marker(answer: list[int], start: int, markers: MarkerVocab) -> int | None:
    for i in range(start, len(answer)):
        if markers.is_branch(answer[i]):
            return i
    return None


def _rewind(slots, seq: Sequence, answer_len: int, config, processor):
    """Cut the answer back to ``answer_len`` tokens; returns the next step there (see :func:`forward_next`)."""
    seq.truncate(answer_len)
    slots.crop(seq.length - 1)
    return (yield from forward_next(slots, seq, [int(seq.buffer[0, seq.length - 1])], config, processor))
