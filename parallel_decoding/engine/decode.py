"""Normal decoding and three-stage parallel decoding of one answer, on a stock Hugging Face causal LM.

Both modes share one prefill, one decode loop (``sequential``) and one sampler (``sampling``), so the comparison
between them measures the method and nothing else. A parallel run loops over ``####`` blocks:

1. skeleton: sequential decoding with :class:`SkeletonLogitsProcessor` until the block's ``####%%%%``;
2. branches: the cache is cut back to the text before the block's first ``####`` and every title is decoded
   as a branch in one sequence (:func:`decode_branches_cached`);
3. merge: the branches, in title order, and the closing ``####%%%%`` are prefilled on top of the cached prefix
   and sequential decoding goes on with the processor still active, so a later block runs 1-3 again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeGuard, Union

import torch
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from ..decoding.hf import check_model, context_length
from ..decoding.interface import Decoder
from ..decoding.select import decoder_for
from .branches import BranchResult, decode_branches_cached
from .sampling import Sampler
from .scheduler import AnswerSteps, Passes, Scheduler, Slots, SoloRunner, run_one
from .sequential import ProcessorChain, Sequence, decode_sequential, forward_next, processor_chain
from .skeleton import (
    MarkerVocab,
    SkeletonBlock,
    SkeletonLogitsProcessor,
    branch_title,
    first_branch_marker,
    parse_skeleton,
)
from .stream import AnswerStream
from .timing import StageTimer

DEFAULT_MAX_NEW_TOKENS = 512  # an answer's budget when none is given: the API's, the command lines' and the server's
MAX_BRANCHES = 64  # branches beyond this many in one block are dropped (and the result says so)
MAX_BLOCKS = 8  # '####' blocks decoded in parallel per answer; later ones are decoded sequentially

# A prompt: the user message, or a list of chat messages ({"role", "content"}).
Prompt = Union[str, list[dict[str, str]]]  # noqa: UP007  (a runtime alias: Python 3.10)
# The (logits, next_token) of a pass (``sequential.forward_next``): one of the two is None.
Step = tuple[Union[torch.Tensor, None], Union[torch.Tensor, None]]  # noqa: UP007


class TextEnum(str, Enum):
    """An enum whose members are their text: ``str()``, f-strings and JSON give the value (``enum.StrEnum``, which
    Python 3.10 lacks)."""

    def __str__(self) -> str:
        return str(self.value)


class StopReason(TextEnum):
    """Why an answer ended (``result["stop_reason"]``): what a server's ``finish_reason`` is made from."""

    EOS = "eos"  # the model wrote a stop token
    MAX_NEW_TOKENS = "max_new_tokens"  # the answer used its max_new_tokens
    CONTEXT = "context"  # the answer reached the model's context before max_new_tokens
    BRANCH_BUDGET = "branch_budget"  # a block's branches used what was left of the budget
    CANCELLED = "cancelled"  # stopped from outside (engine.cancel)


LENGTH_STOPS = frozenset({StopReason.MAX_NEW_TOKENS, StopReason.CONTEXT, StopReason.BRANCH_BUDGET})


class CapKind(TextEnum):
    """The kind of each cap an answer hit (``result["cap_kinds"]``, beside the readable ``result["caps"]``)."""

    MAX_NEW_TOKENS = "max_new_tokens"
    CONTEXT = "context"
    BRANCH_BUDGET = "branch_budget"
    MAX_BRANCHES = "max_branches"  # a block's branches beyond max_branches were dropped
    MAX_BLOCKS = "max_blocks"  # later blocks were decoded sequentially
    BRANCH_TOKENS = "branch_tokens"  # a branch reached max_branch_tokens


class PromptErrorKind(TextEnum):
    """Why the engine refused a prompt."""

    INVALID = "invalid_prompt"  # not a string, messages or token ids
    EMPTY = "empty_prompt"
    NO_TEMPLATE = "no_chat_template"  # messages this tokenizer cannot render
    CONTEXT_LENGTH = "context_length_exceeded"  # the prompt fills the model's context


def prompt_error(kind: PromptErrorKind, message: str) -> ValueError:
    """A refused prompt: a ValueError (so the results' ``error`` column names it as it always has) that carries its
    ``kind`` (the message is for people, the kind for programs: see :func:`prompt_error_kind`)."""
    error = ValueError(message)
    error.kind = kind  # type: ignore[attr-defined]
    return error


def prompt_error_kind(error: BaseException) -> PromptErrorKind | None:
    """The kind of a prompt the engine refused (:func:`prompt_error`), or None for any other error."""
    kind = getattr(error, "kind", None)
    return kind if isinstance(kind, PromptErrorKind) else None


@dataclass
class GenerationConfig:
    """The decoding settings shared by normal decoding and every parallel stage."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None  # the random stream of this run (None: torch's global one)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.sampler = Sampler(self.do_sample, self.temperature, self.top_p, self.top_k, self.generator)


def _generation_config(gen: dict[str, Any]) -> GenerationConfig:
    unknown = set(gen) - {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "generator"}
    if unknown:
        raise TypeError(f"unknown generation setting(s): {', '.join(sorted(unknown))}")
    return GenerationConfig(**gen)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The prompt wrapped in the tokenizer's chat template: ``prompt`` is the user message (what generate.py sends)
    or a list of chat messages (``{"role", "content"}``, as an OpenAI-style client sends them). A tokenizer without
    a template gets the text of a lone user message as it is.

    A message's content is text: special-token text in it (``<|im_start|>system``) is tokenized as the characters
    it is, never as the control token, so roles come only from ``role``. The template's own special tokens stay
    special, and content holding no special-token text is tokenized exactly as the template alone tokenizes it."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)
    ):
        raise prompt_error(
            PromptErrorKind.INVALID, "the prompt must be a string or a non-empty list of {role, content} messages"
        )
    if not any(m["content"].strip() for m in messages):
        raise prompt_error(PromptErrorKind.EMPTY, "the prompt is empty")
    special = _special_token_pattern(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        if len(messages) != 1 or messages[0].get("role", "user") != "user":
            raise prompt_error(
                PromptErrorKind.NO_TEMPLATE,
                "this tokenizer has no chat template, so the prompt must be one user message",
            )
        content = messages[0]["content"]
        split = special is not None and special.search(content) is not None
        return tokenizer.encode(content, add_special_tokens=True, split_special_tokens=split)
    if special is None or not any(special.search(m["content"]) for m in messages):
        return _template_ids(tokenizer, messages)
    return _content_as_text_ids(tokenizer, messages, special)


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on some releases
        ids = ids["input_ids"]
    return list(ids)


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    """A pattern matching the text of any special token of ``tokenizer`` (longest first, as the tokenizer matches
    them), or None if it has none."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts = {token.content for token in decoder.values() if token.special}
    texts |= set(getattr(tokenizer, "all_special_tokens", None) or [])
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


CONTENT_MARK = "\x00content{}\x00"  # stands for message i's content while the template is rendered


def _content_as_text_ids(tokenizer, messages: list[dict], special: re.Pattern) -> list[int]:
    """The template's ids with the content tokenized as text: the template is rendered once with a mark for each
    content, so the special tokens outside the marks are the template's; the text between them (template text and
    content alike) is tokenized with ``split_special_tokens``, as the tokenizer tokenizes the text between special
    tokens."""
    marked = [{**m, "content": CONTENT_MARK.format(i)} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    pieces = re.split("\x00content(\\d+)\x00", rendered)
    if sorted(int(i) for i in pieces[1::2]) != list(range(len(messages))):
        # The template drops, repeats or rewrites some content, so where it lies cannot be told.
        raise prompt_error(
            PromptErrorKind.INVALID,
            "a message holds special-token text and this chat template rewrites message content; remove that text",
        )
    ids: list[int] = []
    text = ""  # text since the last special token of the template
    for index, piece in enumerate(pieces):
        if index % 2:  # a content
            text += messages[int(piece)]["content"]
            continue
        start = 0
        for match in special.finditer(piece):
            text += piece[start : match.start()]
            ids += _text_ids(tokenizer, text) + [tokenizer.convert_tokens_to_ids(match.group())]
            text, start = "", match.end()
        text += piece[start:]
    return ids + _text_ids(tokenizer, text)


def _text_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """EOS ids from the generation config and the tokenizer, plus ``<|im_end|>`` where the vocabulary has one."""
    return stop_token_ids_of((getattr(model, "generation_config", None), model.config), tokenizer)


def stop_token_ids_of(configs, tokenizer) -> frozenset[int]:
    """:func:`stop_token_ids` from the model's configs (its generation config and config, either may be None)
    rather than a loaded model: what a client of a serving engine that holds the model elsewhere needs."""
    ids: set[int] = set()
    for source in (*configs, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(ids)


@functools.lru_cache(maxsize=8)
def marker_vocab(tokenizer: PreTrainedTokenizerBase) -> MarkerVocab:
    return MarkerVocab.from_tokenizer(tokenizer)


def prepare_prompt(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: Prompt, gen: dict[str, Any]
) -> tuple[GenerationConfig, list[int], int]:
    """Check the model and the settings and tokenize the prompt; returns ``(config, prompt_ids, budget)``, the budget
    being the tokens the answer may have: ``max_new_tokens``, or fewer where the model's context ends first."""
    check_model(model)
    config = _generation_config(gen)
    prompt_ids = list(prompt) if is_token_ids(prompt) else chat_prompt_ids(tokenizer, prompt)
    return config, prompt_ids, answer_budget(config.max_new_tokens, len(prompt_ids), context_length(model))


def is_token_ids(prompt: object) -> TypeGuard[list[int]]:
    """Whether ``prompt`` is already the chat prompt's token ids (a non-empty list of ints): what a server that
    applies the template off the engine's thread submits."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def solo_scheduler(model: PreTrainedModel, compile: Any, decoder: Decoder | None = None) -> Scheduler:
    """A scheduler for one answer on the decoder ``decoding.select.decoder_for`` picks (``decoder`` when the caller
    holds one): what ``normal_decode`` and ``parallel_decode`` run on (the batch engine, ``engine.batch.Engine``,
    packs many answers instead)."""
    return Scheduler(SoloRunner(decoder_for(model, compile, decoder)))


def budget_stop(max_new_tokens: int, budget: int) -> StopReason:
    """Which budget an answer that used all of it reached: the model's context, or max_new_tokens."""
    return StopReason.CONTEXT if budget < max_new_tokens else StopReason.MAX_NEW_TOKENS


def budget_cap(max_new_tokens: int, budget: int) -> str:
    """The cap an answer that used its whole ``budget`` hit: the model's context, or ``max_new_tokens``."""
    if budget < max_new_tokens:
        return f"the answer reached the model's context ({budget} tokens after the prompt)"
    return f"the answer reached max_new_tokens ({budget})"


def answer_budget(max_new_tokens: int, prompt_len: int, context: int) -> int:
    """The tokens an answer may have: ``max_new_tokens``, or fewer where the model's context ends first."""
    if prompt_len >= context:
        raise prompt_error(
            PromptErrorKind.CONTEXT_LENGTH, f"the prompt has {prompt_len} tokens; the model's context is {context}"
        )
    return min(max_new_tokens, context - prompt_len)


@dataclass
class BranchLimits:
    """The caps of parallel decoding (see :func:`parallel_decode`)."""

    max_branches: int = MAX_BRANCHES
    max_blocks: int = MAX_BLOCKS
    max_branch_tokens: int | None = None
    jump_forward: bool = True

    def __post_init__(self) -> None:
        if (
            self.max_branches < 1
            or self.max_blocks < 0
            or (self.max_branch_tokens is not None and self.max_branch_tokens < 1)
        ):
            raise ValueError(
                f"max_branches and max_branch_tokens must be >= 1 and max_blocks >= 0, "
                f"got {self.max_branches}, {self.max_branch_tokens} and {self.max_blocks}"
            )


@dataclass
class AnswerSpec:
    """One answer to decode, checked: the prompt's ids, the settings and the budget. ``steps(slots)`` is its state
    machine, which the scheduler runs; ``limits`` None means normal decoding."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompt_ids: list[int]
    config: GenerationConfig
    budget: int  # tokens the whole answer may have
    logits_processor: LogitsProcessorList | None = None
    limits: BranchLimits | None = None
    stream: AnswerStream | None = None  # told which answer tokens are settled, as they are

    @classmethod
    def make(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt: Prompt,
        logits_processor: LogitsProcessorList | None = None,
        limits: BranchLimits | None = None,
        stream: AnswerStream | None = None,
        **gen: Any,
    ) -> AnswerSpec:
        config, prompt_ids, budget = prepare_prompt(model, tokenizer, prompt, gen)
        return cls(model, tokenizer, prompt_ids, config, budget, logits_processor, limits, stream)

    @property
    def slots_needed(self) -> int:
        """KV slots the answer can fill: the prompt and the budget (a block's branches replace its skeleton)."""
        return len(self.prompt_ids) + self.budget

    @property
    def what(self) -> str:
        return f"a prompt of {len(self.prompt_ids)} tokens and {self.budget} new tokens"

    def steps(self, slots: Slots) -> AnswerSteps:
        return normal_steps(self, slots) if self.limits is None else parallel_steps(self, slots)


@torch.inference_mode()
def normal_decode(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Prompt,
    logits_processor: LogitsProcessorList | None = None,
    compile: Any = False,
    decoder: Decoder | None = None,
    **gen: Any,
) -> dict[str, Any]:
    """Sequential decoding of the answer to ``prompt`` (the user message). Greedy unless ``do_sample``.

    ``logits_processor``: optional extra :class:`~transformers.LogitsProcessorList`, applied at every step (its
    ``input_ids`` are on the scores' device).
    ``compile``: False (the eager reference), True, or "auto"/"on"/"off" (see ``decoding.interface.compile_enabled``):
    decode on a static KV arena with a compiled step; same tokens. ``decoder``: the decoder to run on, held by the
    caller (e.g. ``decoding.arena.prepare_fast_decoder(model, warm_up=True)``, whose graphs then serve every answer
    it is given); without one, compile on makes a fast decoder for this answer.
    """
    spec = AnswerSpec.make(model, tokenizer, prompt, logits_processor, **gen)
    return run_one(solo_scheduler(model, compile, decoder), spec)


def normal_steps(spec: AnswerSpec, slots: Slots) -> AnswerSteps:
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
        **normal_ended(stop == "budget", config.max_new_tokens, budget).fields(),
        "steps": slots.steps,
    }


# --- parallel decoding, one function per stage -----------------------------------------------------------------------

UNCLOSED_FALLBACK = "the model opened a #### block but did not close it with ####%%%%; decoded sequentially"
NO_BLOCK_FALLBACK = "the model wrote no ####Title: block; decoded sequentially"


@dataclass
class ParallelRun:
    """What stays fixed while one answer is decoded in parallel: its slots, the settings and the processors."""

    slots: Slots  # the answer's KV cache
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
class AnswerCaps:
    """The caps an answer hit, readable (``caps``) and typed (``cap_kinds``, in the same order), and why it stopped:
    kept alike by the engine's parallel answer and the completions path's (``completions.method``)."""

    caps: list[str] = field(default_factory=list)
    cap_kinds: list[CapKind] = field(default_factory=list)
    stop_reason: StopReason = StopReason.EOS

    def cap(self, kind: CapKind, message: str) -> None:
        self.caps.append(message)
        self.cap_kinds.append(kind)

    def budget_reached(self, max_new_tokens: int, budget: int) -> None:
        """The answer used its whole ``budget``: the model's context, or ``max_new_tokens``."""
        self.stop_reason = budget_stop(max_new_tokens, budget)
        self.cap(CapKind(self.stop_reason), budget_cap(max_new_tokens, budget))

    def branch_budget_reached(self, block_index: int, budget: int, room: int) -> None:
        self.stop_reason = StopReason.BRANCH_BUDGET
        self.cap(CapKind.BRANCH_BUDGET, branch_budget_cap(block_index, budget, room))

    def fields(self) -> dict:
        """The result's ``caps``, ``cap_kinds`` and ``stop_reason``."""
        return {"caps": self.caps, "cap_kinds": self.cap_kinds, "stop_reason": self.stop_reason}


def normal_ended(budget_used: bool, max_new_tokens: int, budget: int) -> AnswerCaps:
    """How a normal answer ended: at a stop token, or having used its whole ``budget``."""
    ended = AnswerCaps()
    if budget_used:
        ended.budget_reached(max_new_tokens, budget)
    return ended


@dataclass
class ParallelAnswer:
    """The state of one parallel answer as its blocks are decoded; token ids only, text is made after the timer."""

    timer: StageTimer
    seq: Sequence
    skeletons: list[list[int]] = field(default_factory=list)  # per block, the segment that wrote its skeleton
    branches: list[dict] = field(default_factory=list)  # {"prefix", "tokens", "block", "stop"} per branch
    fallback: str | None = None
    blocks: int = 0  # blocks decoded in parallel so far
    block_search_from: int = 0  # answer index after the last merged block: where the next block is looked for
    ended: AnswerCaps = field(default_factory=AnswerCaps)  # the caps it hit and why it stopped

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
    logits_processor: LogitsProcessorList | None = None,
    compile: Any = False,
    jump_forward: bool = True,
    decoder: Decoder | None = None,
    **gen: Any,
) -> dict[str, Any]:
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
    ``compile`` and ``decoder`` as in :func:`normal_decode`. ``jump_forward=False`` spends one pass on each token the
    skeleton forces (same greedy answer, more passes).
    """
    limits = BranchLimits(max_branches, max_blocks, max_branch_tokens, jump_forward)
    spec = AnswerSpec.make(model, tokenizer, prompt, logits_processor, limits, **gen)
    return run_one(solo_scheduler(model, compile, decoder), spec)


def parallel_steps(spec: AnswerSpec, slots: Slots) -> AnswerSteps:
    """The state machine of a parallel answer: rounds of skeleton, branches and merge (see ``engine.scheduler``)."""
    config, prompt_ids, budget, limits = spec.config, spec.prompt_ids, spec.budget, spec.limits
    if limits is None:
        raise ValueError("a parallel answer needs its BranchLimits")
    markers = marker_vocab(spec.tokenizer)
    skeleton = SkeletonLogitsProcessor(prompt_length=len(prompt_ids), markers=markers)
    run = ParallelRun(
        slots,
        config,
        stop_token_ids(spec.model, spec.tokenizer),
        markers,
        budget,
        limits,
        skeleton,
        skeleton_processor=ProcessorChain(list(spec.logits_processor or []), skeleton),
        sequential_processor=processor_chain(spec.logits_processor),
        stream=spec.stream,
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


def _decode_round(run: ParallelRun, answer: ParallelAnswer, step: Step) -> Passes[Step | None]:
    """A sequential segment from ``step`` (the ``(logits, next_token)`` of :func:`forward_next`) and, when it closed
    a block, the block's branches and their merge. Returns the next step, or None when the answer is done."""
    tokens = yield from _sequential_segment(run, answer, step)
    if tokens is None:
        return None
    block, block_start = _closed_block(run, answer, tokens)
    merged, budget_hit = yield from _decode_block_branches(run, answer, block, block_start)
    return (yield from _merge_block(run, answer, block, block_start, merged, budget_hit))


def _sequential_segment(run: ParallelRun, answer: ParallelAnswer, step: Step) -> Passes[list[int] | None]:
    """Stage 1 (or 3): sequential decoding until a block closes, an EOS or the budget. Returns the answer's tokens
    when a block closed (its skeleton is kept), else None: the answer ended here, sequentially."""
    parallel = answer.blocks < run.limits.max_blocks
    segment_start = answer.written
    logits, next_token = step
    stop = yield from decode_sequential(
        run.slots,
        answer.seq,
        logits,
        run.budget - answer.written,
        run.config,
        run.stop_ids,
        processor=run.segment_processor(answer.blocks),
        block_end=run.markers.is_block_end if parallel else None,
        skeleton=run.skeleton if parallel and run.limits.jump_forward else None,
        next_token=next_token,
        on_step=_settle_sequential(run, answer, parallel),
    )
    tokens = answer.seq.answer
    # A sequential segment is stage 1 when it wrote a skeleton (or came before any block), else stage 3.
    stage = "stage1" if stop == "block_end" or answer.blocks == 0 else "stage3"
    if stop != "block_end":
        if parallel:
            stop = yield from _fall_back_if_open(run, answer, tokens, stop)
        answer.timer.lap(stage)
        if stop == "budget":
            answer.ended.budget_reached(run.config.max_new_tokens, run.budget)
        return None
    answer.timer.lap(stage)
    answer.skeletons.append(tokens[segment_start:])
    return tokens


def _fall_back_if_open(run: ParallelRun, answer: ParallelAnswer, tokens: list[int], stop: str) -> Passes[str]:
    """The fallback when an answer ended inside a ``####`` block that never closed: a skeleton that never closed
    is titles and ellipses, not an answer, so go back to where it started and let the model write that part
    sequentially, as normal decoding would. Returns why the answer stopped."""
    open_block = first_branch_marker(tokens, answer.block_search_from, run.markers)
    if open_block is None:
        return stop
    answer.fallback = UNCLOSED_FALLBACK
    logits, next_token = yield from _rewind(run.slots, answer.seq, open_block, run.config, run.sequential_processor)
    return (
        yield from decode_sequential(
            run.slots,
            answer.seq,
            logits,
            run.budget - open_block,
            run.config,
            run.stop_ids,
            processor=run.sequential_processor,
            next_token=next_token,
            on_step=_settle_sequential(run, answer, False),
        )
    )


def _closed_block(run: ParallelRun, answer: ParallelAnswer, tokens: list[int]) -> tuple[SkeletonBlock, int]:
    """The block the segment closed, its branches cut to ``max_branches``, and the answer index of its first
    ``####``."""
    block = parse_skeleton(tokens[answer.block_search_from :], run.markers)
    if block is None:  # cannot happen: block_end fired on '####' '%%%%', which always parses as a closing
        raise RuntimeError("the skeleton's closing marker was seen but could not be parsed")
    cap = cut_branches(block, run.limits.max_branches, answer.blocks)
    if cap is not None:
        answer.ended.cap(CapKind.MAX_BRANCHES, cap)
    return block, answer.block_search_from + block.start


def cut_branches(block: SkeletonBlock, max_branches: int, block_index: int) -> str | None:
    """Keep the first ``max_branches`` branches of ``block``; returns the cap that was hit, or None."""
    found = len(block.branch_prefixes)
    if found <= max_branches:
        return None
    block.branch_prefixes = block.branch_prefixes[:max_branches]
    return f"block {block_index}: {found} branches, kept the first {max_branches}"


def branch_share(budget: int, block_start: int, block: SkeletonBlock, max_branch_tokens: int | None) -> tuple[int, int]:
    """``(room, per_branch)``: the tokens the block's branches may write together, and one branch alone.

    The whole block must fit in what is left of the answer's ``budget`` after the text before it
    (``block_start`` tokens): its titles and closing marker always do (the skeleton held them and more), so the
    branches share the rest; ``max_branch_tokens`` caps one branch further.
    """
    room = budget - block_start - sum(len(p) for p in block.branch_prefixes) - len(block.closing)
    return room, room if max_branch_tokens is None else min(room, max_branch_tokens)


def settle_branch_stops(results: list[BranchResult], per_branch: int, room: int) -> bool:
    """After the branch stage: a branch whose cap was all that was left of the budget stopped at the budget (its
    ``stop`` says so from here on). Returns whether the branches used up the budget (the answer ends after the
    block)."""
    for result in results:
        if result.stop == "cap" and per_branch == room:
            result.stop = "budget"
    used = sum(len(r.tokens) for r in results)
    return used == room or any(r.stop == "budget" for r in results)


def branch_budget_cap(block_index: int, budget: int, room: int) -> str:
    return (
        f"block {block_index}: the branches used the answer's budget ({budget} tokens in all, "
        f"{room} left for branches); the branch stage stopped and the answer ends after the block"
    )


def blocks_cap(max_blocks: int) -> str:
    return f"{max_blocks} blocks decoded in parallel; later blocks are decoded sequentially"


def branch_cap(block_index: int, title: str, max_branch_tokens: int | None) -> str:
    return f"block {block_index}: branch {title!r} reached its token cap ({max_branch_tokens})"


def _decode_block_branches(
    run: ParallelRun, answer: ParallelAnswer, block: SkeletonBlock, block_start: int
) -> Passes[tuple[list[int], bool]]:
    """Stage 2: every branch of the block in one sequence, within what is left of the budget. Returns the merged
    tokens (each title and its branch, in title order) and whether the branches used up the budget."""
    room, per_branch = branch_share(run.budget, block_start, block, run.limits.max_branch_tokens)
    if not block.branch_prefixes:
        return [], False
    if room >= len(block.branch_prefixes):  # else not even one step of all branches fits
        results = yield from decode_branches_cached(
            run.slots,
            answer.seq.prompt_len + block_start,
            block.branch_prefixes,
            per_branch,
            stop_token_ids=run.stop_ids | run.markers.branch_ids,
            sampler=run.config.sampler,
            max_total_tokens=room,
            on_step=_settle_branches(run.stream, answer, block, block_start),
        )
    else:
        results = [BranchResult(tokens=[], stop="budget") for _ in block.branch_prefixes]
    budget_hit = settle_branch_stops(results, per_branch, room)
    merged: list[int] = []
    for prefix, result in zip(block.branch_prefixes, results):
        merged += prefix + result.tokens
        answer.branches.append({"prefix": prefix, "tokens": result.tokens, "block": answer.blocks, "stop": result.stop})
    if budget_hit:
        answer.ended.branch_budget_reached(answer.blocks, run.budget, room)
    answer.timer.lap("stage2")
    return merged, budget_hit


def _merge_block(
    run: ParallelRun,
    answer: ParallelAnswer,
    block: SkeletonBlock,
    block_start: int,
    merged: list[int],
    budget_hit: bool,
) -> Passes[Step | None]:
    """Stage 3: the branches in title order and the closing marker replace the skeleton and are prefilled on top of
    the cached prefix. Returns the next step (see :func:`forward_next`), or None when the answer is done."""
    answer.blocks += 1
    if answer.blocks == run.limits.max_blocks:
        answer.ended.cap(CapKind.MAX_BLOCKS, blocks_cap(run.limits.max_blocks))
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
            answer.ended.budget_reached(run.config.max_new_tokens, run.budget)
        answer.timer.lap("stage3")
        return None
    step = yield from forward_next(run.slots, seq, merged, run.config, run.segment_processor(answer.blocks))
    answer.timer.lap("stage3")
    return step


def _parallel_result(run: ParallelRun, answer: ParallelAnswer, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The result of a parallel answer; the string work (skeleton, branch and answer text) comes after the timer."""
    for branch in answer.branches:
        branch["title"] = branch_title(branch.pop("prefix"), tokenizer)
        tokens = branch.pop("tokens")
        branch["text"] = tokenizer.decode(tokens, skip_special_tokens=True)
        branch["tokens"] = len(tokens)
        if branch["stop"] == "cap":
            answer.ended.cap(
                CapKind.BRANCH_TOKENS, branch_cap(branch["block"], branch["title"], run.limits.max_branch_tokens)
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
        "stage1_response": "\n".join(str(tokenizer.decode(s, skip_special_tokens=True)) for s in answer.skeletons),
        "branches": answer.branches,
        "stage1_time": timer.get("stage1"),
        "stage2_time": timer.get("stage2"),
        "stage3_time": timer.get("stage3"),
        "fallback": answer.fallback,
        **answer.ended.fields(),
        "steps": run.slots.steps,
    }


def _settle_sequential(run: ParallelRun, answer: ParallelAnswer, parallel: bool) -> Callable[[], None] | None:
    """The ``on_step`` of a sequential segment when the answer streams: text is settled up to a ``####`` that may
    open a block (in a segment that may open one)."""
    stream = run.stream
    if stream is None:
        return None
    return lambda: stream.sequential(answer.seq, answer.block_search_from if parallel else None, run.markers.is_branch)


def _settle_branches(
    stream: AnswerStream | None, answer: ParallelAnswer, block: SkeletonBlock, block_start: int
) -> Callable[[list[list[int]], list[bool]], None] | None:
    """The ``on_step`` of a branch stage when the answer streams: the branches in title order, as they finish."""
    if stream is None:
        return None
    return lambda outputs, finished: stream.branches(answer.seq, block_start, block.branch_prefixes, outputs, finished)


def _rewind(
    slots: Slots, seq: Sequence, answer_len: int, config: GenerationConfig, processor: ProcessorChain | None
) -> Passes[Step]:
    """Cut the answer back to ``answer_len`` tokens; returns the next step there (see :func:`forward_next`)."""
    seq.truncate(answer_len)
    slots.crop(seq.length - 1)
    return (yield from forward_next(slots, seq, [int(seq.buffer[0, seq.length - 1])], config, processor))
