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
from dataclasses import dataclass

import torch

from .branches import BranchResult, decode_branches_cached
from .sequential import Sequence, decode_sequential, processor_chain
from ..decoding.select import decoder_for
from .sampling import Sampler
from .timing import StageTimer
from ..decoding.hf import check_model, context_length
from .skeleton import MarkerVocab, SkeletonLogitsProcessor, branch_title, parse_skeleton

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


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The user message wrapped in the tokenizer's chat template (raw text if it has none)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty")
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on some releases
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(prompt, add_special_tokens=True)


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


def _start(model, tokenizer, prompt: str, gen: dict):
    check_model(model)
    config = _generation_config(gen)
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    limit = context_length(model)
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    budget = min(config.max_new_tokens, limit - len(prompt_ids))
    return config, prompt_ids, budget


def _decoder(model, compile, prompt_ids: list[int], budget: int):
    decoder = decoder_for(model, compile)
    if hasattr(decoder, "reserve"):  # a fixed arena: refuse the row before decoding if it cannot fit
        decoder.reserve(len(prompt_ids) + budget, f"a prompt of {len(prompt_ids)} tokens and {budget} new tokens")
    return decoder
def _budget_cap(config, budget: int) -> str:
    if budget < config.max_new_tokens:
        return f"the answer reached the model's context ({budget} tokens after the prompt)"
    return f"the answer reached max_new_tokens ({budget})"


@torch.inference_mode()
def normal_decode(model, tokenizer, prompt: str, logits_processor=None, compile=False, **gen) -> dict:
    """Sequential decoding of the answer to ``prompt`` (the user message). Greedy unless ``do_sample``.

    ``logits_processor``: optional extra :class:`~transformers.LogitsProcessorList`, applied at every step.
    ``compile``: False (the eager reference), True, or "auto"/"on"/"off" (see ``decoders.compile_enabled``):
    decode on the model's static KV arena with a compiled step; same tokens.
    """
    config, prompt_ids, budget = _start(model, tokenizer, prompt, gen)
    stop_ids = stop_token_ids(model, tokenizer)
    decoder = _decoder(model, compile, prompt_ids, budget)
    timer = StageTimer.for_model(model)
    seq = Sequence(prompt_ids, len(prompt_ids) + budget)
    logits = decoder.forward(prompt_ids)
    stop = decode_sequential(decoder, seq, logits, budget, config, stop_ids, processor=processor_chain(logits_processor))
    timer.lap("decode")
    answer = seq.answer
    return {
        "response": tokenizer.decode(answer, skip_special_tokens=True),
        "time": timer.get("decode"),
        "length": len(answer),
        "prompt_tokens": len(prompt_ids),
        "caps": [_budget_cap(config, budget)] if stop == "budget" else [],
        "steps": decoder.steps,
    }


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
    if max_branches < 1 or max_blocks < 0 or (max_branch_tokens is not None and max_branch_tokens < 1):
        raise ValueError(
            f"max_branches and max_branch_tokens must be >= 1 and max_blocks >= 0, "
            f"got {max_branches}, {max_branch_tokens} and {max_blocks}"
        )
    config, prompt_ids, budget = _start(model, tokenizer, prompt, gen)
    stop_ids = stop_token_ids(model, tokenizer)
    markers = marker_vocab(tokenizer)
    decoder = _decoder(model, compile, prompt_ids, budget)
    timer = StageTimer.for_model(model)

    # Room for the whole answer: the budget bounds skeletons, merged blocks and continuation alike.
    seq = Sequence(prompt_ids, len(prompt_ids) + budget)
    skeleton = SkeletonLogitsProcessor(prompt_length=len(prompt_ids), markers=markers)
    processor = processor_chain([skeleton, *(logits_processor or [])])
    sequential_processor = processor_chain(logits_processor)
    logits = decoder.forward(prompt_ids)
    skeletons: list[list[int]] = []  # token ids; text is made after the timed loop
    branches: list[dict] = []
    caps: list[str] = []
    fallback = None
    blocks = 0
    block_search_from = 0  # answer index after the last merged block

    while True:
        remaining = budget - (seq.length - seq.prompt_len)
        if remaining <= 0:
            break
        parallel = blocks < max_blocks
        segment_start = seq.length - seq.prompt_len
        stop = decode_sequential(
            decoder, seq, logits, remaining, config, stop_ids,
            processor=processor if parallel else sequential_processor,
            block_end=markers.is_block_end if parallel else None,
            skeleton=skeleton if parallel and jump_forward else None,
        )
        answer = seq.answer
        # A sequential segment is stage 1 when it wrote a skeleton (or came before any block), else stage 3.
        segment_stage = "stage1" if stop == "block_end" or blocks == 0 else "stage3"
        if stop != "block_end":
            open_block = _first_branch_marker(answer, block_search_from, markers) if parallel else None
            if open_block is not None:
                # A skeleton that never closed is titles and ellipses, not an answer: go back to where it
                # started and let the model write that part sequentially, as normal decoding would.
                fallback = "the model opened a #### block but did not close it with ####%%%%; decoded sequentially"
                logits = _rewind(decoder, seq, open_block)
                stop = decode_sequential(
                    decoder, seq, logits, budget - open_block, config, stop_ids, processor=sequential_processor
                )
            timer.lap(segment_stage)
            if stop == "budget":
                caps.append(_budget_cap(config, budget))
            break
        timer.lap(segment_stage)
        block = parse_skeleton(answer[block_search_from:], markers)
        if block is None:  # cannot happen: block_end fired on '####' '%%%%', which always parses as a closing
            raise RuntimeError("the skeleton's closing marker was seen but could not be parsed")
        block_start = block_search_from + block.start
        skeletons.append(answer[segment_start:])
        if len(block.branch_prefixes) > max_branches:
            caps.append(f"block {blocks}: {len(block.branch_prefixes)} branches, kept the first {max_branches}")
            block.branch_prefixes = block.branch_prefixes[:max_branches]

        # The whole block must fit in what is left of the budget: its titles and closing marker always do (the
        # skeleton held them and more), so the branches share the rest.
        room = budget - block_start - sum(len(p) for p in block.branch_prefixes) - len(block.closing)
        merged: list[int] = []
        budget_hit = False
        if block.branch_prefixes:
            prefix_len = seq.prompt_len + block_start
            per_branch = room if max_branch_tokens is None else min(room, max_branch_tokens)
            if room >= len(block.branch_prefixes):  # else not even one step of all branches fits
                results = decode_branches_cached(
                    decoder, prefix_len, block.branch_prefixes, per_branch,
                    stop_token_ids=stop_ids | markers.branch_ids, sampler=config.sampler, max_total_tokens=room,
                )
            else:
                results = [BranchResult(tokens=[], stop="budget") for _ in block.branch_prefixes]
            for prefix, result in zip(block.branch_prefixes, results):
                if result.stop == "cap" and per_branch == room:  # its cap was what was left of the budget
                    result.stop = "budget"
                merged += prefix + result.tokens
                branches.append({"prefix": prefix, "tokens": result.tokens, "block": blocks, "stop": result.stop})
            used = sum(len(r.tokens) for r in results)
            budget_hit = used == room or any(r.stop == "budget" for r in results)
            if budget_hit:
                caps.append(f"block {blocks}: the branches used the answer's budget ({budget} tokens in all, "
                            f"{room} left for branches); the branch stage stopped and the answer ends after the block")
            timer.lap("stage2")
        blocks += 1
        if blocks == max_blocks:
            caps.append(f"{max_blocks} blocks decoded in parallel; later blocks are decoded sequentially")

        # Merge: the branches in title order and the closing marker replace the skeleton.
        merged += block.closing
        seq.truncate(block_start)
        seq.extend(merged)
        skeleton.state.reset()
        decoder.crop(seq.prompt_len + block_start)
        block_search_from = block_start + len(merged)
        if budget_hit or seq.length - seq.prompt_len >= budget:
            if not budget_hit:
                caps.append(_budget_cap(config, budget))
            timer.lap("stage3")
            break
        logits = decoder.forward(merged)
        timer.lap("stage3")

    # String work, after the timer: skeleton, branch and answer text.
    for branch in branches:
        branch["title"] = branch_title(branch.pop("prefix"), tokenizer)
        tokens = branch.pop("tokens")
        branch["text"] = tokenizer.decode(tokens, skip_special_tokens=True)
        branch["tokens"] = len(tokens)
        if branch["stop"] == "cap":
            caps.append(f"block {branch['block']}: branch {branch['title']!r} reached its token cap ({max_branch_tokens})")
    if not branches and fallback is None:
        fallback = "the model wrote no ####Title: block; decoded sequentially"
    answer = seq.answer
    return {
        "response": tokenizer.decode(answer, skip_special_tokens=True),
        "time": timer.total,
        "length": len(answer),
        "prompt_tokens": len(prompt_ids),
        "num_branches": len(branches),
        "num_blocks": blocks,
        "stage1_response": "\n".join(tokenizer.decode(s, skip_special_tokens=True) for s in skeletons),
        "branches": branches,
        "stage1_time": timer.get("stage1"),
        "stage2_time": timer.get("stage2"),
        "stage3_time": timer.get("stage3"),
        "fallback": fallback,
        "caps": caps,
        "steps": decoder.steps,
    }


def _first_branch_marker(answer: list[int], start: int, markers: MarkerVocab) -> int | None:
    for i in range(start, len(answer)):
        if markers.is_branch(answer[i]):
            return i
    return None


def _rewind(decoder, seq: Sequence, answer_len: int) -> torch.Tensor:
    """Cut the answer back to ``answer_len`` tokens; returns the next-token logits there."""
    seq.truncate(answer_len)
    decoder.crop(seq.length - 1)
    return decoder.forward([int(seq.buffer[0, seq.length - 1])])
