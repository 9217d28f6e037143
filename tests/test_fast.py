"""The fast path (KV arena + compiled step per bucket) against the eager reference, and jump-forward.

Compiling takes seconds per graph on a CPU, so the compiled decoders are made once per module (a Qwen2 with the
real vocabulary, a Llama, the embedded model), with two buckets, 1 and 4 rows: five ragged branches are then more
rows than the largest bucket, two or three rows are padded to four, and every other pass (prefill, tree prefill,
merge) reaches either a compiled bucket or the uncompiled exact-size pass. After warm-up the compiled runs go under
``fail_on_recompile``.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from conftest import tiny_decoder
from reference import decode_branches_reference
from test_engine import TITLES, ForwardCounter, _encode, _scripted

from parallel_decoding import decode_branches, normal_decode, parallel_decode
from parallel_decoding.decoding.arena import PADDING, ArenaFullError, FastDecoder, prepare_fast_decoder
from parallel_decoding.decoding.eager import EagerDecoder
from parallel_decoding.decoding.interface import SHARED, compile_enabled

SMALL_BUCKETS = (1, 4)


@contextlib.contextmanager
def no_recompiles():
    with torch.compiler.set_stance("fail_on_recompile"):
        yield


@pytest.fixture(scope="module", autouse=True)
def model_classes_known_before_compiling():
    """transformers keeps a registry of the model classes built so far and compiled graphs guard on its size: build
    one model of each family this module uses before anything is compiled (a run loads one model, so never sees it)."""
    for family in ("qwen2", "llama"):
        tiny_decoder(family)


# The compiled decoders this module holds, one per model: each test passes its model's decoder on (``decoder=``).
DECODERS: dict[torch.nn.Module, FastDecoder] = {}


def _compiled(model, capacity=512, buckets=SMALL_BUCKETS):
    DECODERS[model] = prepare_fast_decoder(model, capacity, buckets=buckets, warm_up=True)
    return model


def fast_decoder(model) -> FastDecoder:
    return DECODERS[model]


@pytest.fixture(scope="module")
def qwen_vocab_model():
    from conftest import build_qwen2_tokenizer

    tokenizer = build_qwen2_tokenizer()
    model = tiny_decoder("qwen2", vocab_size=len(tokenizer), attn_implementation="sdpa")
    return _compiled(model), tokenizer


@pytest.fixture(scope="module")
def llama_model():
    return _compiled(tiny_decoder("llama", attn_implementation="eager"))


@pytest.fixture(params=["qwen2", "llama"])
def small_model(request, qwen_vocab_model, llama_model):
    return qwen_vocab_model[0] if request.param == "qwen2" else llama_model


# --- the arena itself (no compile needed) --------------------------------------------------------------------------


def _arena_keys(decoder: FastDecoder, length: int) -> list[torch.Tensor]:
    return [layer.keys[:, :, :length].clone() for layer in decoder.arena.layers]


def test_rewind_and_prefill_again_equals_a_fresh_prefill():
    model = tiny_decoder("qwen2")
    a, b, c = list(range(10, 30)), list(range(40, 47)), list(range(60, 65))
    rewound = FastDecoder(model, 64, compile=False)
    rewound.forward(a)
    rewound.forward(b)
    allocated = [(layer.keys, layer.values) for layer in rewound.arena.layers]
    rewound.crop(len(a))
    logits_rewound = rewound.forward(c)
    fresh = FastDecoder(model, 64, compile=False)
    fresh.forward(a)
    logits_fresh = fresh.forward(c)
    assert rewound.length == fresh.length == len(a) + len(c)
    assert torch.equal(logits_rewound, logits_fresh)
    for x, y in zip(_arena_keys(rewound, len(a) + len(c)), _arena_keys(fresh, len(a) + len(c))):
        assert torch.equal(x, y)
    # Never reallocated: a rewind only moves the length, and every layer keeps the tensors it was given at first.
    assert all(
        layer.keys is keys and layer.values is values for layer, (keys, values) in zip(rewound.arena.layers, allocated)
    )


@torch.inference_mode()
def test_padding_rows_change_nothing():
    model = tiny_decoder("llama")
    prefix = list(range(5, 25))
    exact, padded = FastDecoder(model, 64, compile=False), FastDecoder(model, 64, compile=False)
    for decoder in (exact, padded):
        decoder.forward(prefix)
    start = len(prefix)
    # ids, positions, slots, branch ids, first visible slots
    rows = [[7, 8, 9], [start, start, start + 1], [start, start + 1, start + 2], [0, 1, 0], [0, 0, 0]]
    logits_exact, tokens_exact = exact._pass(torch.tensor(rows))  # (3, V), (3,)
    spare = padded.arena.spare_slot
    garbage = [[3, 99, 17, 250, 4], [900, 0, 5, 1, 2], [spare] * 5, [PADDING] * 5, [spare] * 5]
    logits_padded, tokens_padded = padded._pass(torch.tensor([r + g for r, g in zip(rows, garbage)]))  # (8, V), (8,)
    torch.testing.assert_close(logits_padded[:3], logits_exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens_padded[:3], tokens_exact)
    for x, y in zip(exact.arena.layers, padded.arena.layers):
        torch.testing.assert_close(y.keys[:, :, : start + 3], x.keys[:, :, : start + 3], rtol=1e-5, atol=1e-5)
        assert not y.keys[:, :, start + 3 : spare].any()  # nothing written between the real rows and the spare slot
    assert padded.arena.key_branch[spare] == PADDING and padded.arena.key_branch[0] == SHARED


@torch.inference_mode()
def test_an_exact_size_pass_over_the_written_slots_equals_a_padded_pass_over_all():
    model = tiny_decoder("qwen2")
    exact = FastDecoder(model, 64, compile=False)  # uncompiled: every pass at its exact size, here 25 slots
    padded = FastDecoder(model, 64, compile=False)  # the same pass on five rows padded to eight, over all 65 slots
    for decoder in (exact, padded):
        decoder.forward(list(range(5, 25)))
    rows = ([7, 8, 9, 10, 11], [20, 20, 21, 20, 21], [0, 1, 1, 2, 2])  # ids, positions, branch ids
    logits_exact = exact.forward(*rows, keep="all")
    spare = padded.arena.spare_slot
    packed = [
        rows[0] + [0] * 3,
        rows[1] + [0] * 3,
        list(range(20, 25)) + [spare] * 3,
        rows[2] + [PADDING] * 3,
        [0] * 5 + [spare] * 3,
    ]  # (5, 8): ids, positions, slots, branch ids, first visible slots
    logits_padded = padded._pass(torch.tensor(packed))[0][:5]  # (5, V)
    torch.testing.assert_close(logits_exact, logits_padded, rtol=1e-5, atol=1e-5)
    assert exact.arena.visible_slots == 25  # the exact pass stated its own slots (begin_pass), nothing restored them
    exact._pass(torch.tensor(packed))  # and the next pass states its own: the compiled passes' shape, all of them
    assert exact.arena.visible_slots == exact.capacity + 1


def test_a_too_small_arena_raises_before_decoding(qwen_vocab_model):
    model, tokenizer = qwen_vocab_model
    small = tiny_decoder("qwen2", vocab_size=len(tokenizer))
    decoder = prepare_fast_decoder(small, capacity=40, compile=False)
    counter = ForwardCounter(small)
    with pytest.raises(ArenaFullError, match=r"needs \d+ KV slots but the arena holds 40; make it larger"):
        normal_decode(small, tokenizer, "Hello there", max_new_tokens=32, compile=True, decoder=decoder)
    assert counter.calls == 0
    with pytest.raises(ValueError, match="compile must be True, False or one of auto, on, off"):
        compile_enabled("fast", torch.device("cpu"))


def test_a_changed_attention_implementation_is_refused():
    """The compiled step does not guard on the model's modules, so the decoder checks the one setting that can
    change under it."""
    model = tiny_decoder("qwen2", attn_implementation="sdpa")
    decoder = FastDecoder(model, 32, compile=False)
    decoder.forward([1, 2, 3])
    model.set_attn_implementation("eager")
    with pytest.raises(
        ValueError, match="attention implementation changed from 'sdpa' to 'eager' after its fast decoder"
    ):
        decoder.forward([4])


# --- compiled decoding equals the eager reference -------------------------------------------------------------------


def test_the_greedy_step_returns_the_argmax_of_its_logits(qwen_vocab_model):
    """``greedy=True`` takes the argmax inside the compiled step (bucket 1, bucket 4 with padding, chosen rows) and
    in the uncompiled exact-size pass; both equal the argmax of the logits the same pass returns, and the eager
    reference's."""
    model, _ = qwen_vocab_model
    prefix = list(range(100, 117))
    passes = [  # token ids, positions, branch ids, rows
        ([5], None, None, None),
        ([5, 6, 7], [17, 17, 17], [0, 1, 2], "all"),
        ([5, 6, 7], [17, 18, 17], [0, 0, 1], [1, 2]),
        ([5, 6, 7, 8, 9, 10], None, None, None),
    ]
    fast, eager = fast_decoder(model), EagerDecoder(model)
    with no_recompiles(), torch.inference_mode():
        for decoder in (fast, eager):
            decoder.reset()
            decoder.forward(prefix)
        for token_ids, positions, branch_ids, rows in passes:
            results = []
            for decoder in (fast, eager):
                for greedy in (False, True):
                    decoder.crop(len(prefix))
                    results.append(decoder.forward(token_ids, positions, branch_ids, rows, greedy=greedy))
            fast_logits, fast_tokens, eager_logits, eager_tokens = results
            assert fast_tokens.shape == fast_logits.shape[:1] and fast_tokens.dtype == torch.long
            assert torch.equal(fast_tokens, fast_logits.argmax(-1))
            assert torch.equal(fast_tokens, eager_tokens)
            torch.testing.assert_close(fast_logits, eager_logits, rtol=1e-4, atol=1e-4)


def _greedy_run(decoder, prefix: list[int], titles: list[list[int]], stop_after: int, length: int) -> list[list[int]]:
    """Greedy single rows after ``prefix`` up to 131 slots, then branches from ``titles`` (tree prefill) decoded
    until ``length`` slots, branch 0 stopping after ``stop_after`` steps: every token each pass chose."""
    decoder.reset()
    chosen = [decoder.forward(prefix, greedy=True).tolist()]
    while decoder.length < 131:
        chosen.append(decoder.forward(chosen[-1], greedy=True).tolist())
    start = decoder.length
    rows = [(t, start + j, b) for b, title in enumerate(titles) for j, t in enumerate(title)]
    ends = list(itertools.accumulate(len(title) for title in titles))
    tokens = decoder.forward(*(list(c) for c in zip(*rows)), keep=[e - 1 for e in ends], greedy=True).tolist()
    chosen.append(tokens)
    active, step = list(range(len(titles))), 0
    while decoder.length < length:
        if step == stop_after:
            active, tokens = active[1:], tokens[1:]
        positions = [start + len(titles[b]) + step for b in active]
        tokens = decoder.forward(tokens, positions, active, keep="all", greedy=True).tolist()
        chosen.append(tokens)
        step += 1
    return chosen


def test_the_flex_step_is_token_identical_across_block_boundaries(small_model):
    """Bucket 1 from 125 to 131 written slots (across 127/128/129), then three ragged branches in bucket 4 (two
    after branch 0 stops, padded) across 256: every token equals the eager reference's, with one graph per bucket."""
    decoder = fast_decoder(small_model)
    assert decoder.attention == "flex" and small_model.config._attn_implementation.startswith("arena_flex_")
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 256, (125,), generator=g).tolist()
    titles = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 3, 4)]
    with torch.inference_mode():
        expected = _greedy_run(EagerDecoder(small_model), prefix, titles, stop_after=12, length=262)
        with no_recompiles():
            assert _greedy_run(decoder, prefix, titles, stop_after=12, length=262) == expected


def test_branches_on_the_arena_equal_the_reference(small_model):
    prefix = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(1))
    free = decode_branches_reference(small_model, prefix, TITLES, max_new_tokens=10)
    eos = free[0][2]  # branch 0 stops third, the others when (if) they meet the same token: ragged ends
    with no_recompiles():
        fast_free = decode_branches(
            small_model, prefix, TITLES, max_new_tokens=10, compile=True, decoder=fast_decoder(small_model)
        )
        fast_eos = decode_branches(
            small_model,
            prefix,
            TITLES,
            max_new_tokens=10,
            eos_token_id=eos,
            compile=True,
            decoder=fast_decoder(small_model),
        )
        fast_three = decode_branches(
            small_model, prefix, TITLES[:3], max_new_tokens=6, compile=True, decoder=fast_decoder(small_model)
        )
    assert fast_free == free  # 5 branches: more rows than the largest bucket (4) until some stop
    assert fast_eos == decode_branches_reference(small_model, prefix, TITLES, max_new_tokens=10, eos_token_id=eos)
    assert len(fast_eos[0]) == free[0].index(eos) < 10
    assert fast_three == decode_branches_reference(small_model, prefix, TITLES[:3], max_new_tokens=6)


def _same_answer(a: dict, b: dict) -> None:
    keys = (
        "response",
        "length",
        "num_branches",
        "num_blocks",
        "stage1_response",
        "branches",
        "fallback",
        "caps",
        "steps",
    )
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


SKELETON = "Let me check each one.\n####Alpha:......\n####Beta two:......\n####Gamma:......\n####%%%%"


@pytest.mark.parametrize(
    "scripts, settings",
    [
        ([SKELETON], dict(max_new_tokens=40)),
        (
            [
                "First part.\n####A:......\n####B:......\n####%%%%",
                " Second.\n####C:......\n####D:......\n####E:......\n####%%%%",
            ],
            dict(max_new_tokens=80, max_branch_tokens=6),
        ),  # a second block; five branches in it
        (["Start.\n####Only:"], dict(max_new_tokens=24)),  # never closed: the sequential fallback after a rewind
        ([], dict(max_new_tokens=20)),  # no block at all
    ],
    ids=["one-block", "two-blocks", "unclosed", "no-block"],
)
def test_parallel_decode_compiled_equals_eager(qwen_vocab_model, scripts, settings):
    model, tokenizer = qwen_vocab_model
    prompt = "Check every option."
    eager = parallel_decode(
        model, tokenizer, prompt, logits_processor=_scripted(tokenizer, prompt, *scripts), **settings
    )
    with no_recompiles():
        fast = parallel_decode(
            model,
            tokenizer,
            prompt,
            logits_processor=_scripted(tokenizer, prompt, *scripts),
            compile=True,
            decoder=fast_decoder(model),
            **settings,
        )
        fast_normal = normal_decode(
            model,
            tokenizer,
            prompt,
            compile=True,
            decoder=fast_decoder(model),
            max_new_tokens=settings["max_new_tokens"],
        )
    _same_answer(eager, fast)
    _same_answer(normal_decode(model, tokenizer, prompt, max_new_tokens=settings["max_new_tokens"]), fast_normal)


def test_sampling_with_a_fixed_seed_is_the_same_compiled(qwen_vocab_model):
    model, tokenizer = qwen_vocab_model
    prompt = "Check every option."
    settings = dict(max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95)
    outputs = []
    for compile in (False, True):
        with no_recompiles() if compile else contextlib.nullcontext():
            outputs.append(
                parallel_decode(
                    model,
                    tokenizer,
                    prompt,
                    logits_processor=_scripted(tokenizer, prompt, SKELETON),
                    compile=compile,
                    decoder=fast_decoder(model) if compile else None,
                    generator=torch.Generator().manual_seed(7),
                    **settings,
                )
            )
    _same_answer(*outputs)
    assert outputs[0]["num_branches"] == 3


# --- jump-forward ---------------------------------------------------------------------------------------------------


def test_forced_skeleton_tokens_take_one_pass_with_the_colon(qwen_vocab_model):
    model, tokenizer = qwen_vocab_model
    prompt = "Check every option."
    counter = ForwardCounter(model)
    out = parallel_decode(
        model, tokenizer, prompt, max_new_tokens=40, logits_processor=_scripted(tokenizer, prompt, SKELETON)
    )
    slow = parallel_decode(
        model,
        tokenizer,
        prompt,
        max_new_tokens=40,
        jump_forward=False,
        logits_processor=_scripted(tokenizer, prompt, SKELETON),
    )
    _same_answer({**out, "steps": None}, {**slow, "steps": None})
    forced = 1 + len(_encode(tokenizer, "......")) + 1 + 1  # the colon, the ellipsis, a newline, '####'
    assert counter.calls == out["steps"] + slow["steps"]  # the counter saw both runs
    jumped, one_by_one = counter.tokens[: out["steps"]], counter.tokens[out["steps"] :]
    tree_prefill = len(_encode(tokenizer, "####Alpha:####Beta two:####Gamma:"))
    stage1 = jumped[1 : jumped.index(tree_prefill)]  # after the prompt's prefill, before the branches
    assert forced == 4 and stage1.count(forced) == 3 and set(stage1) == {1, forced}  # one pass per title's colon
    assert set(one_by_one[1 : one_by_one.index(tree_prefill)]) == {1}
    assert slow["steps"] - out["steps"] == 3 * (forced - 1)


def test_jump_forward_keeps_the_embedded_models_answers(embedded):
    model, tokenizer, prompts = embedded
    for prompt in prompts[:2]:
        fast = parallel_decode(model, tokenizer, prompt, max_new_tokens=160)
        slow = parallel_decode(model, tokenizer, prompt, max_new_tokens=160, jump_forward=False)
        _same_answer({**fast, "steps": None}, {**slow, "steps": None})
        assert fast["num_branches"] > 0 and slow["steps"] - fast["steps"] == 3 * fast["num_branches"]


# --- the embedded model: compile on vs off over rows of both retrieval files ----------------------------------------


@pytest.fixture(scope="module")
def embedded():
    from test_tiny_model import MODEL_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding.tasks import build_prompt, load_dataset

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    prompts = []
    for path in ("data/retrieval_4.jsonl", "data/retrieval_10.jsonl"):
        rows = load_dataset("retrieval", str(MODEL_DIR.parents[1] / path))
        prompts += [build_prompt("retrieval", row) for row in rows[:2]]
    return model, tokenizer, prompts


def test_embedded_model_compiled_equals_eager(embedded):
    model, tokenizer, prompts = embedded
    decoder = prepare_fast_decoder(model, capacity=1024, buckets=(1, 16), warm_up=True)  # ten branches: 16 rows
    for prompt in prompts:
        eager_normal = normal_decode(model, tokenizer, prompt, max_new_tokens=256)
        eager_parallel = parallel_decode(model, tokenizer, prompt, max_new_tokens=256)
        with no_recompiles():
            fast_normal = normal_decode(model, tokenizer, prompt, max_new_tokens=256, compile=True, decoder=decoder)
            _same_answer(eager_normal, fast_normal)
            fast_parallel = parallel_decode(model, tokenizer, prompt, max_new_tokens=256, compile=True, decoder=decoder)
            _same_answer(eager_parallel, fast_parallel)
        assert eager_parallel["num_branches"] > 0


# --- compile settings and graph limits (last in the module: the new model class below changes what every graph
# compiled before it guards on) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("isolated", [True, False])
def test_compile_settings_with_and_without_isolated_graphs(monkeypatch, isolated):
    """torch with ``isolate_recompiles`` (2.13 here): this decoder's own graphs, without module guards; older
    torch (the GPU machine may have one): the shared cache with every guard and a raised per-function limit."""
    import parallel_decoding.decoding.arena as arena

    monkeypatch.setattr(arena, "isolates_recompiles", lambda: isolated)
    decoder = FastDecoder(tiny_decoder("qwen2"), 16, buckets=(1, 2, 4, 8, 16), compile=False)
    # torch's own way to change its settings for a while (pytest's monkeypatch deletes a ConfigModule entry on
    # undo, which breaks dynamo for the rest of the process); both limits are back as they were after the test.
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        settings = decoder._compile_settings()
        # no process-wide setting changes: the raised limits hold for this decoder's compiled calls only
        assert torch._dynamo.config.recompile_limit == 8 and torch._dynamo.config.accumulated_recompile_limit == 8
        with torch._dynamo.config.patch(decoder._limits):  # what _call_compiled runs under
            recompile_limit = torch._dynamo.config.recompile_limit
            accumulated_limit = torch._dynamo.config.accumulated_recompile_limit
    assert settings["options"]["size_asserts"] is False
    assert "triton.cudagraphs" not in settings["options"]  # CPU
    if isolated:
        assert settings["isolate_recompiles"] is True and settings["recompile_limit"] == 10
        assert settings["options"]["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    else:
        assert set(settings) == {"options"} and "guard_filter_fn" not in settings["options"]
        assert recompile_limit > 8
    assert accumulated_limit >= 10


def test_a_model_of_a_new_class_built_after_warm_up_recompiles_instead_of_failing():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_decoder("qwen2", attn_implementation="sdpa")
    decoder = prepare_fast_decoder(model, 32, buckets=(1,), warm_up=True)
    decoder.forward([1, 2, 3])  # exact size: uncompiled
    expected = EagerDecoder(model)
    expected.forward([1, 2, 3])
    fresh_class = type("RegistryProbeForCausalLM", (LlamaForCausalLM,), {})
    fresh_class(
        LlamaConfig(
            vocab_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )  # a class transformers never saw
    logits = decoder.forward([4])  # bucket 1 compiles again (the registry grew), within the decoder's limit
    torch.testing.assert_close(logits, expected.forward([4]), rtol=1e-4, atol=1e-4)
