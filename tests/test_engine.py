"""The engine: branch isolation, the mask, the three stages end to end, fallbacks and caps."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_decoder
from reference import decode_branches_reference
from transformers import LogitsProcessor, LogitsProcessorList

from parallel_decoding import branch_mask, decode_branches, normal_decode, parallel_decode
from parallel_decoding.engine.decode import chat_prompt_ids, marker_vocab, stop_token_ids

TITLES = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [22, 23, 24, 25, 26, 27, 28]]  # 5 ragged titles


class ForwardCounter:
    def __init__(self, model):
        self.calls, self.tokens = 0, []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls += 1
        self.tokens.append(kwargs["input_ids"].shape[1])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_branches_equal_each_branch_decoded_alone(family, attn):
    model = tiny_decoder(family, attn_implementation=attn)
    prefix = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    counter = ForwardCounter(model)
    with torch.no_grad():
        together = decode_branches(model, prefix, TITLES, max_new_tokens=12)
    assert counter.calls == 12 + 1  # prefix prefill + tree prefill + 11 steps
    assert counter.tokens[1] == sum(len(t) for t in TITLES)  # all titles in one pass
    assert counter.tokens[2:] == [len(TITLES)] * 11  # one token per branch per pass
    with torch.no_grad():
        alone = decode_branches_reference(model, prefix, TITLES, max_new_tokens=12)
    assert together == alone
    assert all(len(t) == 12 for t in together)


def test_branches_through_the_triton_kernel_equal_each_branch_alone():
    # The project's kernel runs under Triton's CPU interpreter here, which is slow: a short run, one family.
    model = tiny_decoder("qwen2", attn_implementation="branch_attention")
    prefix = torch.randint(0, 256, (1, 13), generator=torch.Generator().manual_seed(3))
    titles = TITLES[:3]
    with torch.no_grad():
        together = decode_branches(model, prefix, titles, max_new_tokens=4)
        alone = decode_branches_reference(model, prefix, titles, max_new_tokens=4)
    assert together == alone
    eager = tiny_decoder("qwen2", attn_implementation="eager")
    with torch.no_grad():
        assert together == decode_branches(eager, prefix, titles, max_new_tokens=4)


def test_finished_branches_leave_the_active_set():
    model = tiny_decoder("qwen2")
    prefix = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        free = decode_branches_reference(model, prefix, TITLES, max_new_tokens=10)
    # Stop at the token branch 0 writes third: branch 0 ends early, others end where they meet it (if ever).
    eos = free[0][2]
    counter = ForwardCounter(model)
    with torch.no_grad():
        together = decode_branches(model, prefix, TITLES, max_new_tokens=10, eos_token_id=eos)
        alone = decode_branches_reference(model, prefix, TITLES, max_new_tokens=10, eos_token_id=eos)
    assert together == alone
    assert together[0] == free[0][:2]
    rows_per_step = counter.tokens[2 : 2 + 9]
    assert rows_per_step[2] < len(TITLES)  # branch 0 no longer decoded after it stopped
    assert rows_per_step == sorted(rows_per_step, reverse=True)


def test_branch_mask_tree_layout():
    # prefix of 2 keys, then branch 0 (2 title tokens), branch 1 (1 title token) prefilled together
    key_branch = torch.tensor([-1, -1, 0, 0, 1], dtype=torch.int32)
    query_branch = torch.tensor([0, 0, 1], dtype=torch.int32)
    visible = branch_mask(key_branch, query_branch, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(visible, expected)
    # a decode step: one token per branch appended after the tree
    key_branch = torch.tensor([-1, -1, 0, 0, 1, 0, 1], dtype=torch.int32)
    visible = branch_mask(key_branch, torch.tensor([0, 1], dtype=torch.int32), torch.float32)[0, 0] == 0
    assert visible.tolist() == [
        [True, True, True, True, False, True, False],
        [True, True, False, False, True, False, True],
    ]


class ScriptedAnswer(LogitsProcessor):
    """Forces ``scripts[k]`` (token ids) right after the k-th ``####%%%%`` of the answer (k=0: from the start)."""

    def __init__(self, prompt_length: int, scripts: list[list[int]], closing: list[int]):
        self.prompt_length, self.scripts, self.closing = prompt_length, scripts, closing

    def __call__(self, input_ids, scores):
        answer = input_ids[0, self.prompt_length :].tolist()
        ends = [i + 2 for i in range(len(answer) - 1) if answer[i : i + 2] == self.closing]
        k = len(ends)
        tail = answer[ends[-1] :] if ends else answer
        if k < len(self.scripts):
            script = self.scripts[k]
            if len(tail) < len(script) and tail == script[: len(tail)]:
                forced = torch.full_like(scores, float("-inf"))
                forced[:, script[len(tail)]] = 0
                return forced
        return scores


@pytest.fixture(scope="module")
def qwen_model():
    from conftest import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    return tiny_decoder("qwen2", vocab_size=len(tokenizer), attn_implementation="sdpa"), tokenizer


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _scripted(tokenizer, prompt, *texts):
    prompt_len = len(chat_prompt_ids(tokenizer, prompt))
    return LogitsProcessorList(
        [ScriptedAnswer(prompt_len, [_encode(tokenizer, t) for t in texts], _encode(tokenizer, "####%%%%"))]
    )


def _branch_reference(model, tokenizer, prefix_ids, titles, cap):
    markers = marker_vocab(tokenizer)
    stops = set(stop_token_ids(model, tokenizer)) | set(markers.branch_ids)
    prefixes = [_encode(tokenizer, f"####{t}:") for t in titles]
    return decode_branches_reference(model, torch.tensor([prefix_ids]), prefixes, cap, eos_token_id=stops)


def test_parallel_decode_runs_three_stages(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Check every option."
    skeleton = "Let me check each one.\n####Alpha:......\n####Beta two:......\n####Gamma:......\n####%%%%"
    out = parallel_decode(
        model,
        tokenizer,
        prompt,
        max_new_tokens=40,
        max_branch_tokens=4,
        logits_processor=_scripted(tokenizer, prompt, skeleton),
    )
    assert out["fallback"] is None
    assert out["num_branches"] == 3 and out["num_blocks"] == 1
    assert [b["title"] for b in out["branches"]] == ["Alpha", "Beta two", "Gamma"]
    assert out["stage1_response"] == skeleton
    # every branch equals that branch decoded alone after the shared prefix
    intro = _encode(tokenizer, "Let me check each one.\n")
    prefix_ids = chat_prompt_ids(tokenizer, prompt) + intro
    alone = _branch_reference(model, tokenizer, prefix_ids, ["Alpha", "Beta two", "Gamma"], 4)
    assert [b["text"] for b in out["branches"]] == [tokenizer.decode(a, skip_special_tokens=True) for a in alone]
    assert [b["tokens"] for b in out["branches"]] == [len(a) for a in alone] == [4, 4, 4]
    assert [b["stop"] for b in out["branches"]] == ["cap"] * 3
    merged = "Let me check each one.\n" + "".join(
        f"####{t}:{tokenizer.decode(a, skip_special_tokens=True)}"
        for t, a in zip(["Alpha", "Beta two", "Gamma"], alone)
    )
    assert out["response"].startswith(merged + "####%%%%")
    assert len(out["response"]) > len(merged + "####%%%%")  # stage 3 went on after the merge
    assert out["length"] == 40  # the whole answer, stage 3 included, within max_new_tokens
    assert out["stage1_time"] > 0 and out["stage2_time"] > 0 and out["stage3_time"] > 0
    assert out["time"] == pytest.approx(out["stage1_time"] + out["stage2_time"] + out["stage3_time"])
    assert "the answer reached max_new_tokens (40)" in out["caps"]


def _lockstep(alone: list[list[int]], room: int) -> list[list[int]]:
    """What the branch stage keeps of branches decoded alone (cut at ``room`` each) under a total of ``room``
    tokens: one token per active branch per step, stopping before a step that would overflow."""
    kept: list[list[int]] = [[] for _ in alone]
    active, left, step = list(range(len(alone))), room, 0
    while active:
        step += 1
        still = [b for b in active if step <= len(alone[b])]
        for b in still:
            kept[b].append(alone[b][step - 1])
        left -= len(still)
        still = [b for b in still if step < room]
        if len(still) > left:
            break
        active = still
    return kept


def test_max_new_tokens_bounds_the_whole_parallel_answer(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Check every option."
    skeleton = "Let me check each one.\n####Alpha:......\n####Beta two:......\n####Gamma:......\n####%%%%"
    titles = ["Alpha", "Beta two", "Gamma"]
    out = parallel_decode(
        model, tokenizer, prompt, max_new_tokens=40, logits_processor=_scripted(tokenizer, prompt, skeleton)
    )
    intro = _encode(tokenizer, "Let me check each one.\n")
    prefixes = [_encode(tokenizer, f"####{t}:") for t in titles]
    room = 40 - len(intro) - sum(len(p) for p in prefixes) - len(_encode(tokenizer, "####%%%%"))
    alone = _branch_reference(model, tokenizer, chat_prompt_ids(tokenizer, prompt) + intro, titles, room)
    kept = _lockstep(alone, room)
    assert [b["tokens"] for b in out["branches"]] == [len(k) for k in kept]
    assert [b["text"] for b in out["branches"]] == [tokenizer.decode(k, skip_special_tokens=True) for k in kept]
    assert sum(len(k) for k in kept) <= room < sum(len(k) for k in kept) + len(titles)
    assert [b["stop"] for b in out["branches"]] == ["budget"] * 3
    # the answer ends after the merged block, within the budget, and says it was capped
    merged = "Let me check each one.\n" + "".join(
        f"####{t}:{tokenizer.decode(k, skip_special_tokens=True)}" for t, k in zip(titles, kept)
    )
    assert out["response"] == merged + "####%%%%"
    assert out["length"] <= 40
    assert any("the branch stage stopped" in c for c in out["caps"])
    # the same answer normally decoded is capped too, at exactly the budget
    assert normal_decode(model, tokenizer, prompt, max_new_tokens=40)["caps"] == [
        "the answer reached max_new_tokens (40)"
    ]


def test_two_blocks_both_run_in_parallel(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Plan it."
    first = "First part.\n####A:......\n####B:......\n####%%%%"
    second = " Second part.\n####C:......\n####D:......\n####E:......\n####%%%%"
    out = parallel_decode(
        model,
        tokenizer,
        prompt,
        max_new_tokens=80,
        max_branch_tokens=6,
        logits_processor=_scripted(tokenizer, prompt, first, second),
    )
    assert out["fallback"] is None
    assert out["num_blocks"] == 2 and out["num_branches"] == 5
    assert [(b["block"], b["title"]) for b in out["branches"]] == [(0, "A"), (0, "B"), (1, "C"), (1, "D"), (1, "E")]
    assert out["response"].count("####%%%%") >= 2


def test_branch_cap_keeps_the_first_and_says_so(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Many."
    skeleton = "Go.\n####A:......\n####B:......\n####C:......\n####%%%%"
    out = parallel_decode(
        model,
        tokenizer,
        prompt,
        max_new_tokens=30,
        max_branches=2,
        logits_processor=_scripted(tokenizer, prompt, skeleton),
    )
    assert [b["title"] for b in out["branches"]] == ["A", "B"]
    assert any("kept the first 2" in c for c in out["caps"])


def test_no_block_falls_back_to_the_sequential_answer(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Say something."
    normal = normal_decode(model, tokenizer, prompt, max_new_tokens=20)
    parallel = parallel_decode(model, tokenizer, prompt, max_new_tokens=20)
    assert parallel["num_branches"] == 0
    assert "no ####Title: block" in parallel["fallback"]
    assert parallel["response"] == normal["response"]
    assert parallel["length"] == normal["length"] == 20


def test_unclosed_block_falls_back_to_sequential_decoding(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Never closes."
    opener = "Start.\n####Only:"  # the model never writes ####%%%% after this title
    processor = _scripted(tokenizer, prompt, opener)
    normal = normal_decode(model, tokenizer, prompt, max_new_tokens=24, logits_processor=processor)
    parallel = parallel_decode(
        model, tokenizer, prompt, max_new_tokens=24, logits_processor=_scripted(tokenizer, prompt, opener)
    )
    assert "did not close" in parallel["fallback"]
    assert parallel["response"] == normal["response"]
    assert "......" not in parallel["response"]


def test_sampling_settings_apply_and_are_validated(qwen_model):
    model, tokenizer = qwen_model
    prompt = "Check every option."
    skeleton = "Let me check each one.\n####Alpha:......\n####Beta two:......\n####Gamma:......\n####%%%%"

    def run(decode, seed=None, **sampling):
        gen = (
            {"do_sample": True, "generator": torch.Generator().manual_seed(seed), **sampling}
            if seed is not None
            else {}
        )
        return (
            decode(
                model,
                tokenizer,
                prompt,
                max_new_tokens=30,
                max_branch_tokens=5,
                logits_processor=_scripted(tokenizer, prompt, skeleton),
                **gen,
            )
            if decode is parallel_decode
            else decode(model, tokenizer, prompt, max_new_tokens=12, **gen)
        )

    for decode in (normal_decode, parallel_decode):
        greedy = run(decode)
        torch.manual_seed(0)
        global_state = torch.get_rng_state()
        a, b, c = run(decode, seed=1), run(decode, seed=1), run(decode, seed=2)
        assert torch.equal(torch.get_rng_state(), global_state)  # every draw came from the given generator
        assert a["response"] == b["response"]  # same seed, same answer
        assert a["response"] != greedy["response"] and a["response"] != c["response"]  # sampling changes answers
        narrow = run(decode, seed=1, top_k=1)  # top-k 1 leaves only the argmax to sample: greedy again
        assert narrow["response"] == greedy["response"]
    # branches draw from the sampler too: sampled branch texts differ from greedy ones, and repeat with the seed
    greedy_branches = [x["text"] for x in greedy["branches"]]
    assert [x["text"] for x in a["branches"]] == [x["text"] for x in b["branches"]]
    assert all(x["text"] != g for x, g in zip(a["branches"], greedy_branches))
    assert all(x["text"] == g for x, g in zip(narrow["branches"], greedy_branches))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        parallel_decode(model, tokenizer, "Hi", temperature=0)
    with pytest.raises(TypeError, match="unknown generation setting"):
        normal_decode(model, tokenizer, "Hi", num_beams=2)


def test_bad_prompts_and_models_raise_one_clear_sentence(qwen_model):
    model, tokenizer = qwen_model
    with pytest.raises(ValueError, match="the prompt is empty"):
        parallel_decode(model, tokenizer, "   ")
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens; the model's context is 1024"):
        normal_decode(model, tokenizer, "word " * 1200)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(ValueError, match="needs a RoPE decoder"):
        parallel_decode(gpt2, tokenizer, "Hi")


def test_token_ids_become_text_only_after_the_timer_stops(qwen_model, monkeypatch):
    import parallel_decoding.engine.decode as engine

    model, tokenizer = qwen_model
    events = []

    class RecordingTimer(engine.StageTimer):
        def lap(self, stage):
            events.append("lap")
            super().lap(stage)

    class RecordingTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def decode(self, *args, **kwargs):
            events.append("decode")
            return tokenizer.decode(*args, **kwargs)

    monkeypatch.setattr(engine, "StageTimer", RecordingTimer)
    prompt = "Check every option."
    skeleton = "Go.\n####Alpha:......\n####Beta:......\n####%%%%"
    wrapped = RecordingTokenizer()
    markers = engine.marker_vocab(tokenizer)  # built once per tokenizer, before any timing
    monkeypatch.setattr(engine, "marker_vocab", lambda _: markers)
    out = parallel_decode(
        model,
        wrapped,
        prompt,
        max_new_tokens=24,
        max_branch_tokens=3,
        logits_processor=_scripted(tokenizer, prompt, skeleton),
    )
    assert out["num_branches"] == 2 and events.count("lap") >= 3
    assert "decode" not in events[: len(events) - events[::-1].index("lap")]  # no decode before the last lap
    events.clear()
    normal_decode(model, wrapped, prompt, max_new_tokens=6)
    assert events == ["lap", "decode"]
