"""The batch engine: many requests in one pass, each with its own branches, equal to each request decoded alone.

The reference is ``normal_decode`` / ``parallel_decode`` on the eager decoder (transformers' DynamicCache), one
request at a time; the engine runs the same state machines on regions of one KV arena (uncompiled here, except
for one compiled case), packed into one pass.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_decoder
from test_engine import _scripted

from parallel_decoding import Engine, normal_decode, parallel_decode
from parallel_decoding.decoding.hf import context_length
from parallel_decoding.decoding.regions import SlotAllocator
from parallel_decoding.engine.batch import DEFAULT_REQUEST_TOKENS, request_seed

ANSWER_KEYS = (
    "response",
    "length",
    "num_branches",
    "num_blocks",
    "stage1_response",
    "branches",
    "fallback",
    "caps",
    "steps",
    "prompt_tokens",
)

# Scripted answers (forced by a logits processor, as in tests/test_engine.py): blocks of ragged branches, two blocks,
# no block at all (the fallback), an unclosed block (the rewind), text after a merge.
SCRIPTS = {
    "three branches": ("Let me check each one.\n####Alpha:......\n####Beta two:......\n####Gamma:......\n####%%%%",),
    "two blocks": (
        "First:\n####A:......\n####B:......\n####%%%%",
        "\nThen:\n####C:......\n####D:......\n####E:......\n####%%%%",
    ),
    "no block": ("Just an answer without any block.",),
    "unclosed": ("Start\n####Only:......\n####Second:......\n",),
    "one branch": ("Hmm.\n####Single step:......\n####%%%%",),
}
PROMPTS = {
    "three branches": "Check every option.",
    "two blocks": "Plan the trip in two rounds of independent steps, please, with care.",
    "no block": "Is it raining?",
    "unclosed": "List the items and judge each one of them now, one by one, and say which is best overall.",
    "one branch": "Why?",
}


def _same(a: dict, b: dict) -> None:
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert {k: a[k] for k in ANSWER_KEYS if k in b} == {k: b[k] for k in ANSWER_KEYS if k in b}


@pytest.fixture(scope="module")
def qwen_model():
    from conftest import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    return tiny_decoder("qwen2", vocab_size=len(tokenizer), attn_implementation="sdpa"), tokenizer


def _cases(max_new_tokens=(60, 24)):
    """(name, parallel, max_new_tokens): every script in both modes, the second budget small enough to cap."""
    return [(name, parallel, budget) for name in SCRIPTS for parallel in (True, False) for budget in max_new_tokens]


def _alone(model, tokenizer, name, parallel, budget, **gen):
    decode = parallel_decode if parallel else normal_decode
    return decode(
        model,
        tokenizer,
        PROMPTS[name],
        logits_processor=_scripted(tokenizer, PROMPTS[name], *SCRIPTS[name]),
        max_new_tokens=budget,
        **gen,
    )


def _batched(engine, tokenizer, cases, **gen):
    requests = [
        engine.submit(
            PROMPTS[name],
            parallel=parallel,
            max_new_tokens=budget,
            logits_processor=_scripted(tokenizer, PROMPTS[name], *SCRIPTS[name]),
            **gen,
        )
        for name, parallel, budget in cases
    ]
    while not engine.idle:
        engine.step()
    return requests


@pytest.mark.parametrize("max_batch_size", [3, 20])
def test_every_request_equals_its_batch_1_answer(qwen_model, max_batch_size):
    model, tokenizer = qwen_model
    cases = _cases()
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, kv_capacity=2048, compile=False)
    requests = _batched(engine, tokenizer, cases)
    for (name, parallel, budget), request in zip(cases, requests):
        assert request.error is None, request.error
        _same(request.result, _alone(model, tokenizer, name, parallel, budget))
    assert engine.scheduler.passes < sum(r.result["steps"] for r in requests)  # passes were shared
    assert engine.scheduler.runner.allocator.free_slots == 2048  # every region went back


def test_sampled_requests_equal_their_batch_1_answers(qwen_model):
    model, tokenizer = qwen_model
    cases = [
        (name, parallel, 40) for name in ("three branches", "two blocks", "no block") for parallel in (True, False)
    ]
    settings = dict(do_sample=True, temperature=0.7, top_p=0.9)
    engine = Engine(model, tokenizer, max_batch_size=4, kv_capacity=1024, compile=False)
    requests = [
        engine.submit(
            PROMPTS[name],
            parallel=parallel,
            max_new_tokens=budget,
            **settings,
            logits_processor=_scripted(tokenizer, PROMPTS[name], *SCRIPTS[name]),
            generator=torch.Generator().manual_seed(request_seed(7, i)),
        )
        for i, (name, parallel, budget) in enumerate(cases)
    ]
    while not engine.idle:
        engine.step()
    for i, ((name, parallel, budget), request) in enumerate(zip(cases, requests)):
        alone = _alone(
            model,
            tokenizer,
            name,
            parallel,
            budget,
            **settings,
            generator=torch.Generator().manual_seed(request_seed(7, i)),
        )
        _same(request.result, alone)


def test_a_request_does_not_see_the_others(qwen_model):
    """Isolation on random weights and random prompts: changing one request's prompt changes no other answer,
    down to the logits of every pass (a processor records them)."""
    model, tokenizer = qwen_model
    from transformers import LogitsProcessor

    class Record(LogitsProcessor):
        def __init__(self):
            self.scores = []

        def __call__(self, input_ids, scores):
            self.scores.append(scores.clone())
            return scores

    generator = torch.Generator().manual_seed(0)
    words = [tokenizer.decode(torch.randint(1000, 30000, (12,), generator=generator).tolist()) for _ in range(3)]
    runs = []
    for other in ("the first version of the other prompt", "a different, longer text in the other request's place"):
        engine = Engine(model, tokenizer, max_batch_size=4, kv_capacity=1024, compile=False)
        recorders = [Record() for _ in words]
        prompts = [words[0], other, words[1], words[2]]
        requests = [
            engine.submit(p, parallel=False, max_new_tokens=12, logits_processor=[r] if r else None)
            for p, r in zip(prompts, [recorders[0], None, recorders[1], recorders[2]])
        ]
        while not engine.idle:
            engine.step()
        runs.append(([requests[i].result for i in (0, 2, 3)], recorders))
    (first, first_scores), (second, second_scores) = runs
    assert [r["response"] for r in first] == [r["response"] for r in second]
    for a, b in zip(first_scores, second_scores):
        assert len(a.scores) == len(b.scores) == 12
        for x, y in zip(a.scores, b.scores):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_many_more_requests_than_the_batch_reuse_the_arena(qwen_model):
    model, tokenizer = qwen_model
    cases = _cases(max_new_tokens=(30,)) * 3  # 30 requests
    # Room for two or three requests at a time: regions are freed and reused all along.
    engine = Engine(model, tokenizer, max_batch_size=4, kv_capacity=260, compile=False)
    starts = set()
    original_allocate = engine.scheduler.runner.allocate

    def allocate(size, what="an answer"):
        region = original_allocate(size, what)
        if region is not None:
            starts.add(region.start)
        return region

    engine.scheduler.runner.allocate = allocate
    requests = _batched(engine, tokenizer, cases)
    for (name, parallel, budget), request in zip(cases, requests):
        _same(request.result, _alone(model, tokenizer, name, parallel, budget))
    assert len(starts) > 1 and 0 in starts  # several places, slot 0 among them again and again
    assert engine.scheduler.runner.allocator.free_slots == 260


def test_the_default_arena_holds_a_full_batch_and_a_smaller_one_says_once_why_requests_wait(qwen_model):
    """By default the arena holds max_batch_size requests of the model's context (engine.batch.kv_capacity_for), so
    a full batch runs at once; an arena given smaller makes requests wait, and the engine warns once, saying why."""
    model, tokenizer = qwen_model
    engine = Engine(model, tokenizer, max_batch_size=8, compile=False)
    assert engine.scheduler.runner.capacity == 8 * min(context_length(model), DEFAULT_REQUEST_TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing waits
        requests = [engine.submit(PROMPTS["no block"], parallel=False, max_new_tokens=30) for _ in range(8)]
        engine.step()
        assert len(engine.scheduler.running) == 8
        while not engine.idle:
            engine.step()
    slots = requests[0].spec.slots_needed
    small = Engine(model, tokenizer, max_batch_size=4, kv_capacity=2 * slots + 1, compile=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        requests = [small.submit(PROMPTS["no block"], parallel=False, max_new_tokens=30) for _ in range(4)]
        small.step()
        assert len(small.scheduler.running) == 2 and len(small.scheduler.waiting) == 2
        while not small.idle:
            small.step()
    said = [str(w.message) for w in caught]
    assert said == [
        "a request waits for KV slots with 2 of max_batch_size=4 requests running: the KV arena is too small for "
        f"that many requests like this one ({requests[0].spec.what}); give the engine a larger kv_capacity to run "
        "them at once"
    ]
    assert all(r.error is None for r in requests)


def test_a_request_that_can_never_fit_is_refused_alone(qwen_model):
    model, tokenizer = qwen_model
    engine = Engine(model, tokenizer, max_batch_size=4, kv_capacity=120, compile=False)
    results = engine.generate(
        [PROMPTS["no block"], PROMPTS["unclosed"] * 3, PROMPTS["no block"]], parallel=False, max_new_tokens=40
    )
    assert results[1] == {
        "error": "ArenaFullError: a prompt of 83 tokens and 40 new tokens needs 123 KV slots but the "
        "arena holds 120; make it larger"
    }
    alone = normal_decode(model, tokenizer, PROMPTS["no block"], max_new_tokens=40)
    _same(results[0], alone)
    _same(results[2], alone)


def test_a_cancelled_request_frees_its_slots(qwen_model):
    model, tokenizer = qwen_model
    engine = Engine(model, tokenizer, max_batch_size=2, kv_capacity=512, compile=False)
    kept = engine.submit(PROMPTS["no block"], parallel=False, max_new_tokens=30)
    cancelled = engine.submit(PROMPTS["three branches"], parallel=True, max_new_tokens=60)
    engine.step()
    engine.step()
    engine.cancel(cancelled)
    assert cancelled.done and cancelled.result is None and len(engine.scheduler.running) == 1
    while not engine.idle:
        engine.step()
    _same(kept.result, normal_decode(model, tokenizer, PROMPTS["no block"], max_new_tokens=30))
    assert engine.scheduler.runner.allocator.free_slots == 512


def test_generate_is_the_same_at_any_batch_size_and_keeps_prompt_order(qwen_model):
    model, tokenizer = qwen_model
    prompts = [PROMPTS[name] for name in SCRIPTS]
    for settings in ({}, {"do_sample": True, "temperature": 0.8, "top_k": 50}):
        answers = [
            Engine(model, tokenizer, max_batch_size=size, kv_capacity=1024, compile=False).generate(
                prompts, parallel=True, max_new_tokens=20, seed=3, **settings
            )
            for size in (1, 2, 5)
        ]
        tokens = [[{k: a[k] for k in ANSWER_KEYS} for a in run] for run in answers]
        assert tokens[0] == tokens[1] == tokens[2]
        assert [a["prompt_tokens"] for a in answers[0]] == [
            len(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for p in prompts
        ]  # prompt order


def test_bad_engine_settings_raise_one_sentence(qwen_model):
    model, tokenizer = qwen_model
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        Engine(model, tokenizer, max_batch_size=0, compile=False)
    engine = Engine(model, tokenizer, max_batch_size=2, kv_capacity=64, compile=False)
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.submit("  ")
    with pytest.raises(TypeError, match="unknown generation setting"):
        engine.generate(["Hi"], beams=2)


def test_compiled_engine_equals_the_eager_reference():
    """The compiled fast path under the engine: requests packed into padded buckets, no recompile after warm-up."""
    from conftest import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    model = tiny_decoder("qwen2", vocab_size=len(tokenizer), attn_implementation="sdpa", seed=1)
    cases = [(name, True, 40) for name in ("three branches", "two blocks", "no block")]
    engine = Engine(model, tokenizer, max_batch_size=3, kv_capacity=512, compile=True, buckets=(4, 16))
    with torch.compiler.set_stance("fail_on_recompile"):
        requests = _batched(engine, tokenizer, cases)
    for (name, parallel, budget), request in zip(cases, requests):
        _same(request.result, _alone(model, tokenizer, name, parallel, budget))


# --- the slot allocator -----------------------------------------------------------------------------------------------


def test_slot_allocator_is_first_fit_and_coalesces_freed_neighbours():
    slots = SlotAllocator(100)
    a, b, c = slots.allocate(30), slots.allocate(30), slots.allocate(30)
    assert (a, b, c) == (0, 30, 60) and slots.allocate(20) is None and slots.free_slots == 10
    slots.free(b, 30)
    assert slots.allocate(31) is None and slots.allocate(10) == 30  # first fit: the hole left by b
    slots.free(30, 10)
    slots.free(a, 30)
    assert slots.largest_free == 60 and slots.allocate(60) == 0  # a and b's ranges merged
    slots.free(0, 60)
    slots.free(c, 30)
    assert slots.largest_free == 100 and slots.free_slots == 100
    with pytest.raises(ValueError, match="already free"):
        slots.free(10, 5)
    with pytest.raises(ValueError, match="at least 1 slot"):
        slots.allocate(0)


# --- streaming --------------------------------------------------------------------------------------------------------


def test_streamed_tokens_join_into_the_answer_and_the_first_branch_streams_live(qwen_model):
    model, tokenizer = qwen_model
    cases = _cases()
    engine = Engine(model, tokenizer, max_batch_size=5, kv_capacity=2048, compile=False)
    streamed = [[] for _ in cases]  # per request: (pass number, tokens) as they were handed over
    requests = []
    for i, (name, parallel, budget) in enumerate(cases):
        requests.append(
            engine.submit(
                PROMPTS[name],
                parallel=parallel,
                max_new_tokens=budget,
                logits_processor=_scripted(tokenizer, PROMPTS[name], *SCRIPTS[name]),
                on_tokens=lambda tokens, i=i: streamed[i].append((engine.scheduler.passes, tokens)),
            )
        )
    while not engine.idle:
        engine.step()
    for (name, parallel, _budget), request, pieces in zip(cases, requests, streamed):
        tokens = [t for _, chunk in pieces for t in chunk]
        assert tokenizer.decode(tokens, skip_special_tokens=True) == request.result["response"], (name, parallel)
        assert len(tokens) == request.result["length"]
        if parallel and request.result["num_branches"] > 1 and not request.result["caps"]:
            first = request.result["branches"][0]
            # the first branch's text was handed over before the branch stage ended: in more than one piece
            first_ids = tokenizer.encode(first["text"], add_special_tokens=False)
            assert len(pieces) > request.result["num_blocks"] + len(first_ids) // 2, (name, len(pieces))
