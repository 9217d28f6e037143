"""Requests packed into one pass of the fast decoder, each in its own region of arena slots, and the flex pass
over a large arena.

One compiled decoder for the module: a Llama with 8 query heads on 1 key/value head of head_dim 32 (grouped-query
attention without copies), an arena of 4000 slots (not a multiple of the flex block, so the last block holds the
spare slot and runs past it), buckets of 1 and 4 rows. Three requests live in regions at slots 0, 1000 and 3880
(the last reaching the arena's final slot); each pass of the packed run is compared with the same request decoded
alone, on the eager reference and on the fast decoder. After warm-up the compiled runs go under
``fail_on_recompile``, so one graph per bucket serves every length.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import tiny_decoder

from parallel_decoding.decoding import flex
from parallel_decoding.decoding.arena import PADDING, ArenaFullError, FastDecoder
from parallel_decoding.decoding.attention import flex_name, set_attention
from parallel_decoding.decoding.backends import backend
from parallel_decoding.decoding.eager import EagerDecoder
from parallel_decoding.decoding.interface import SHARED

CAPACITY = 4000
REGIONS = {"A": (0, 127), "B": (1000, 129), "C": (3880, 112)}  # request: (first slot of its region, prompt length)
SINGLE_STEPS, BRANCH_STEPS = 5, 3  # then B forks two branches, the others go on with one row each


@pytest.fixture(scope="module")
def gqa_model():
    tiny_decoder("qwen2")  # the model classes of this module exist before anything compiles (see test_fast.py)
    return tiny_decoder("llama", attn_implementation="sdpa", num_attention_heads=8, num_key_value_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def compiled(gqa_model):
    decoder = FastDecoder(gqa_model, CAPACITY, buckets=(1, 4))
    assert decoder.attention == "flex" and gqa_model.config._attn_implementation == flex_name("sdpa")
    decoder.warm_up()
    return decoder


@pytest.fixture(scope="module")
def uncompiled(gqa_model):
    return FastDecoder(gqa_model, CAPACITY, compile=False)


def _script(name: str, seed: int = 0) -> list[list[tuple[int, int, int]]]:
    """A request's passes, each a list of rows (token, position, branch id): its prompt, single steps, then steps
    of two branches (request B) or of one row."""
    length = REGIONS[name][1]
    g = torch.Generator().manual_seed(seed + ord(name))
    tokens = torch.randint(0, 256, (length + SINGLE_STEPS + 2 * BRANCH_STEPS,), generator=g).tolist()
    passes = [[(tokens[i], i, SHARED) for i in range(length)]]
    passes += [[(tokens[length + j], length + j, SHARED)] for j in range(SINGLE_STEPS)]
    at = length + SINGLE_STEPS
    for j in range(BRANCH_STEPS):
        if name == "B":
            passes.append([(tokens[at + 2 * j], at + j, 0), (tokens[at + 2 * j + 1], at + j, 1)])
        else:
            passes.append([(tokens[at + 2 * j], at + j, SHARED)])
    return passes


def _reference(model, script) -> list[torch.Tensor]:
    decoder = EagerDecoder(model)
    with torch.inference_mode():
        return [decoder.forward(*_columns(rows), keep="all") for rows in script]


def _columns(rows):
    tokens, positions, branches = (list(column) for column in zip(*rows))
    return tokens, positions, None if set(branches) == {SHARED} else branches


def _packed(decoder: FastDecoder, scripts: dict) -> dict[str, list[torch.Tensor]]:
    """Run the requests' passes together, pass i of every request in one forward_packed call; per request the
    logits of each of its passes."""
    written = {name: 0 for name in scripts}
    out = {name: [] for name in scripts}
    for i in range(len(next(iter(scripts.values())))):
        rows, owners = [], []
        for name, script in scripts.items():
            first = REGIONS[name][0]
            for k, (token, position, branch) in enumerate(script[i]):
                rows.append((token, position, first + written[name] + k, branch, first))
                owners.append(name)
            written[name] += len(script[i])
        logits = decoder.forward_packed(*(list(column) for column in zip(*rows)), keep="all")  # (R, V)
        for name in scripts:
            out[name].append(logits[[k for k, owner in enumerate(owners) if owner == name]])
    return out


@pytest.mark.parametrize("names", ["AC", "ABC"], ids=["two-requests", "three-requests"])
@pytest.mark.parametrize("which", ["compiled", "uncompiled"])
def test_packed_requests_equal_each_request_alone(gqa_model, request, which, names):
    decoder = request.getfixturevalue(which)
    scripts = {name: _script(name) for name in names}
    with torch.compiler.set_stance("fail_on_recompile"):
        packed = _packed(decoder, scripts)
        alone = {name: _packed(decoder, {name: scripts[name]})[name] for name in names}
    assert decoder.length == 0  # forward_packed leaves the bookkeeping to the caller
    for name in names:
        reference = _reference(gqa_model, scripts[name])
        for got, own, expected in zip(packed[name], alone[name], reference):
            torch.testing.assert_close(got, own, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_one_requests_tokens_change_no_other_requests_logits(compiled):
    scripts = {name: _script(name) for name in "ABC"}
    with torch.compiler.set_stance("fail_on_recompile"):
        before = _packed(compiled, scripts)
        after = _packed(compiled, {**scripts, "B": _script("B", seed=1)})
    assert not torch.equal(before["B"][0], after["B"][0])
    for name in "AC":
        for x, y in zip(before[name], after[name]):
            assert torch.equal(x, y)


def test_greedy_decoding_near_the_end_of_a_large_arena_equals_the_reference(gqa_model, compiled):
    """One request in the region at 3880 on bucket 1, greedy through the block that holds the spare slot, up to
    the arena's last slot; one graph for every length."""
    first, length = REGIONS["C"][0], 100
    prompt = torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(3)).tolist()
    reference = EagerDecoder(gqa_model)
    with torch.inference_mode():
        expected = reference.forward(prompt, greedy=True)
        tokens = [int(expected[0])]
        for _ in range(CAPACITY - first - length):
            tokens.append(int(reference.forward(tokens[-1:], greedy=True)[0]))
    got = [
        int(
            compiled.forward_packed(
                prompt, range(length), range(first, first + length), [SHARED] * length, [first] * length, greedy=True
            )[0]
        )
    ]
    with torch.compiler.set_stance("fail_on_recompile"):
        for step, slot in enumerate(range(first + length, CAPACITY)):
            out = compiled.forward_packed(got[-1:], [length + step], [slot], [SHARED], [first], greedy=True)
            got.append(int(out[0]))
    assert got == tokens and len(got) == CAPACITY - first - length + 1


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_the_flex_mask_equals_the_dense_mask_uncompiled(gqa_model):
    """The BlockMask's rule (flex run eagerly) against the dense mask: regions, branches, padding rows, and rows
    whose KV blocks end at the spare slot's block."""
    decoder = FastDecoder(gqa_model, CAPACITY, compile=False)
    scripts = {name: _script(name) for name in "ABC"}
    _packed(decoder, {name: script[:4] for name, script in scripts.items()})  # prompts and three single steps
    spare = decoder.arena.spare_slot
    #        A        B, branch 0  B, branch 1  C          padding
    rows = [
        [1, 2, 3, 4, 0, 0],
        [130, 132, 132, 115, 0, 0],
        [130, 1132, 1133, 3995, spare, spare],
        [SHARED, 0, 1, SHARED, PADDING, PADDING],
        [0, 1000, 1000, 3880, spare, spare],
    ]
    name = flex.register(gqa_model, "sdpa")
    with torch.inference_mode():
        dense_logits, _ = decoder._pass(torch.tensor(rows))
        gqa_model.set_attn_implementation(name)
        try:
            flex_logits, _ = decoder._pass(torch.tensor(rows), attend=backend("flex"))
        finally:
            set_attention(gqa_model, "sdpa")
    assert gqa_model.config._attn_implementation == name  # set_attention: the wrapper of sdpa is sdpa already
    gqa_model.set_attn_implementation("sdpa")
    torch.testing.assert_close(flex_logits[:4], dense_logits[:4], rtol=1e-5, atol=1e-5)
    assert flex_logits.isfinite().all()


def test_the_block_mask_visits_the_blocks_that_hold_the_live_slots(uncompiled):
    spare = uncompiled.arena.spare_slot
    tables = uncompiled.arena.tables
    assert uncompiled.arena.key_branch.shape[0] == 32 * flex.BLOCK  # 4001 slots in whole blocks, PADDING past 4000
    assert (uncompiled.arena.key_branch[spare:] == PADDING).all()
    # One answer from slot 0 (forward_packed's default: every slot up to the largest row slot), then regions.
    cases = [
        ([0], [(0, 1)], [0]),
        ([127], [(0, 128)], [0]),
        ([128], [(0, 129)], [0, 1]),
        ([5, 1000, 300], [(0, 1001)], list(range(8))),
        ([3999], [(0, 4000)], list(range(32))),
        ([spare], [], []),
        ([50, 1050], [(0, 51), (1000, 1051)], [0, 7, 8]),
        ([130, 3000], [(128, 131), (2990, 3001)], [1, 23]),
    ]
    for slots, live, blocks in cases:
        branch = [PADDING if s == spare else SHARED for s in slots]
        tables.visit(live)
        mask = flex.block_mask(tables, torch.tensor(slots), torch.tensor(branch), torch.tensor(slots))
        assert mask.kv_num_blocks.flatten().tolist() == [len(blocks)] and mask.shape == (1, 1, len(slots), CAPACITY + 1)
        assert mask.kv_indices.flatten()[: len(blocks)].tolist() == blocks


def test_the_dense_compiled_pass_honours_regions(gqa_model):
    """attention="dense" (the old compiled step, kept for comparisons) on a request whose region starts at 100."""
    decoder = FastDecoder(gqa_model, 256, buckets=(1,), attention="dense")
    assert decoder.attention == "dense" and gqa_model.config._attn_implementation in ("sdpa", flex_name("sdpa"))
    decoder.warm_up()
    prompt, first = list(range(3, 40)), 100
    reference = EagerDecoder(gqa_model)
    with torch.inference_mode():
        expected = [reference.forward(prompt)] + [reference.forward([t]) for t in (5, 6, 7)]
    count = len(prompt)
    got = [decoder.forward_packed(prompt, range(count), range(first, first + count), [SHARED] * count, [first] * count)]
    with torch.compiler.set_stance("fail_on_recompile"):
        for step, token in enumerate((5, 6, 7)):
            slot = first + len(prompt) + step
            got.append(decoder.forward_packed([token], [len(prompt) + step], [slot], [SHARED], [first]))
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_forward_packed_refuses_rows_it_cannot_place(uncompiled):
    good = dict(token_ids=[1, 2], positions=[0, 1], slots=[10, 11], branch_ids=[SHARED, SHARED], first_slots=[10, 10])
    cases = [
        (dict(slots=[10, 10]), ValueError, "the same slot"),
        (dict(first_slots=[10, 12]), ValueError, "first visible slot"),
        (dict(branch_ids=[SHARED, PADDING]), ValueError, "reserved for padding"),
        (dict(slots=[10, CAPACITY]), ArenaFullError, "outside the KV arena"),
        (dict(positions=[0]), ValueError, "one or more rows"),
    ]
    for change, error, message in cases:
        with pytest.raises(error, match=message):
            uncompiled.forward_packed(**{**good, **change})
    steps = uncompiled.steps
    uncompiled.forward_packed(**good)
    assert uncompiled.steps == steps + 1


def test_each_request_of_an_exact_pass_takes_the_layout_its_text_allows(uncompiled):
    arena = uncompiled.arena
    prompt = list(range(2000, 2010))
    arena.record_on_host(prompt, [SHARED] * 10)
    assert arena.span_layout(prompt, [SHARED] * 10, 2000, 2010) == "causal"  # a prefill fills its span in order
    assert arena.span_layout(prompt[::-1], [SHARED] * 10, 2000, 2010) == "tree"  # out of order: the mask decides
    arena.record_on_host([2010], [SHARED])
    assert arena.span_layout([2010], [SHARED], 2000, 2011) == "all"  # one row of shared text over shared text
    arena.record_on_host([2010, 2011], [SHARED, SHARED])
    assert arena.span_layout([2010, 2011], [SHARED] * 2, 2000, 2012) == "tree"  # rows after text: not sdpa's causal
    arena.record_on_host([2010, 2011], [0, 1])
    assert arena.span_layout([2010, 2011], [0, 1], 2000, 2012) == "tree"  # branch rows
    arena.record_on_host([2012], [SHARED])
    assert arena.span_layout([2012], [SHARED], 2000, 2013) == "tree"  # a shared row over text that holds branches
    arena.record_on_host([2010, 2011], [SHARED, SHARED])  # the merged text overwrote the branches
    assert arena.span_layout([2012], [SHARED], 2000, 2013) == "all"


@torch.inference_mode()
def test_the_layouts_without_a_mask_give_the_masked_logits(uncompiled, monkeypatch):
    """A packed pass of a prefill (causal), a shared step (all) and branch rows (tree), and the same rows with every
    request under its mask: the same logits."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (64,), generator=g).tolist()
    setup = dict(  # two prompts: at 1000 (30 tokens) and at 1500 (10 tokens)
        token_ids=tokens[:40],
        positions=list(range(30)) + list(range(10)),
        slots=list(range(1000, 1030)) + list(range(1500, 1510)),
        branch_ids=[SHARED] * 40,
        first_slots=[1000] * 30 + [1500] * 10,
    )
    rows = dict(  # a prompt at 3000; one shared row after the text at 1000; two branch rows after the text at 1500
        token_ids=tokens[40:60] + tokens[60:63],
        positions=list(range(20)) + [30] + [10, 10],
        slots=list(range(3000, 3020)) + [1030] + [1510, 1511],
        branch_ids=[SHARED] * 20 + [SHARED] + [0, 1],
        first_slots=[3000] * 20 + [1000] + [1500, 1500],
    )
    layouts = []
    real_layout = uncompiled.arena.span_layout

    def spy(*args):
        layouts.append(real_layout(*args))
        return layouts[-1]

    outs = []
    model = uncompiled.model
    previous = model.config._attn_implementation  # an earlier test may have set the model back to plain sdpa
    model.set_attn_implementation(flex_name("sdpa"))  # the wrapper, as making an uncompiled decoder sets it
    try:
        for layout in (spy, lambda *args: "tree"):
            monkeypatch.setattr(uncompiled.arena, "span_layout", layout)
            uncompiled.forward_packed(**setup)
            outs.append(uncompiled.forward_packed(**rows, keep="all"))
    finally:
        model.set_attn_implementation(previous)
    assert layouts == ["causal", "causal", "causal", "all", "tree"]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


# --- how the model's attention implementation is switched (no compile needed) ---------------------------------------


@pytest.mark.parametrize("base", ["sdpa", "eager"])
def test_the_flex_wrapper_is_its_base_for_every_other_caller(base):
    model = tiny_decoder("qwen2", attn_implementation=base)
    prefix, rows = list(range(5, 40)), ([7, 8, 9], [35, 35, 36], [0, 1, 1])

    def eager_run():
        decoder = EagerDecoder(model)
        with torch.inference_mode():
            return [decoder.forward(prefix, keep="all"), decoder.forward(*rows, keep="all"), decoder.forward([3])]

    before = eager_run()
    decoder = FastDecoder(model, 64, buckets=(1,))  # compiled flex: owns the model's attention (nothing compiled yet)
    assert model.config._attn_implementation == flex_name(base) == decoder.attn_implementation
    for x, y in zip(before, eager_run()):
        assert torch.equal(x, y)
    set_attention(model, base)  # what runs/ does before each mode: a no-op here
    assert model.config._attn_implementation == flex_name(base)
    model.set_attn_implementation(base)  # set directly: the compiled decoder takes its wrapper back
    decoder._check_attention()
    assert model.config._attn_implementation == flex_name(base)
    other = "eager" if base == "sdpa" else "sdpa"
    set_attention(model, other)
    with pytest.raises(ValueError, match=f"changed from '{base}' to '{other}' after its fast decoder"):
        decoder.forward_packed([1], [0], [0], [SHARED], [0])


def test_the_branch_kernel_and_other_implementations_keep_the_fast_decoder_refused():
    model = tiny_decoder("qwen2", attn_implementation="sdpa")
    model.config._attn_implementation = "branch_attention"  # what the kernel's registration sets (kernel not needed)
    with pytest.raises(ValueError, match="builds its own mask over the arena"):
        FastDecoder(model, 32)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="wraps sdpa or eager attention"):
        FastDecoder(model, 32)
    FastDecoder(model, 32, attention="dense")  # the dense step takes the model as it is, as before
    with pytest.raises(ValueError, match="attention must be one of auto, flex, dense"):
        FastDecoder(model, 32, attention="sparse")


@pytest.mark.parametrize("cuda_graphs, calls", [(False, 1), (True, 2)])
def test_warm_up_calls_each_bucket_until_its_graph_is_recorded(monkeypatch, cuda_graphs, calls):
    """CUDA graph trees run a function's first call eagerly (their warm-up) and record at the second: warm_up
    makes both, so a timed step only replays."""
    decoder = FastDecoder(tiny_decoder("qwen2"), 32, buckets=(1, 2, 4), compile=False)
    seen, marks = [], []
    decoder._compiled = lambda packed: seen.append(packed.shape[1])
    decoder.use_cuda_graphs = cuda_graphs
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(seen)))
    decoder.warm_up()
    assert decoder.warm_up_calls == calls
    assert seen == [w for w in (1, 2, 4) for _ in range(calls)]
    assert marks == (list(range(len(seen))) if cuda_graphs else [])  # a new generation before every call


# --- the compiled step against the arena's capacity (a measuring helper, held to the eager reference here) ----------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(decoder, token: int) -> tuple[int, float]:
    """One greedy one-row step after ``token``: the next token and the step's seconds (device-synchronized)."""
    _synchronize(decoder.device)
    start = time.perf_counter()
    token = int(decoder.forward([token], greedy=True)[0])  # the read-back syncs a CUDA step too
    return token, time.perf_counter() - start


@torch.inference_mode()
def step_times(decoder, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Prefill ``prompt`` (untimed) on a fresh answer, then ``steps`` greedy one-row steps: the tokens chosen and
    the seconds of each step (device-synchronized). Works for any decoder (``EagerDecoder`` too)."""
    decoder.reset()
    tokens, seconds = [int(decoder.forward(prompt, greedy=True)[0])], []
    for _ in range(steps):
        token, elapsed = _timed_step(decoder, tokens[-1])
        tokens.append(token)
        seconds.append(elapsed)
    return tokens, seconds


@torch.inference_mode()
def _interleaved_sweep(decoders: dict, prompt: list[int], steps: int) -> dict:
    """Every decoder prefills ``prompt``, then they take their greedy steps in turns (step i of each, in an order
    rotating with i), so a shared machine's load falls on all alike: per decoder, (tokens, seconds per step)."""
    keys = list(decoders)
    runs = {}
    for key in keys:
        decoders[key].reset()
        runs[key] = ([int(decoders[key].forward(prompt, greedy=True)[0])], [])
    for step in range(steps):
        for key in keys[step % len(keys) :] + keys[: step % len(keys)]:
            token, elapsed = _timed_step(decoders[key], runs[key][0][-1])
            runs[key][0].append(token)
            runs[key][1].append(elapsed)
    return runs


def capacity_table(model, capacities, attentions, prefill: int, steps: int, skip: int, repeats: int) -> list[dict]:
    """Median ms of the compiled one-row greedy step (bucket 1) per (capacity, attention), same text for all.

    One ``FastDecoder(model, capacity, buckets=(1,), attention=...)`` each, warmed up; a random prompt of
    ``prefill`` tokens, then ``steps`` greedy steps of which the first ``skip`` are dropped. The decoders take
    their steps in turns, ``repeats`` sweeps, under ``fail_on_recompile``. Rows: ``capacity``, ``attention``,
    ``median_ms``, ``sweep_medians_ms``, ``tokens_equal`` (every sweep's tokens equal the eager reference
    decoder's).
    """
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(0, vocab, (prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    reference, _ = step_times(EagerDecoder(model), prompt, steps)
    decoders = {}
    for capacity in capacities:
        for attention in attentions:
            decoders[capacity, attention] = FastDecoder(model, capacity, buckets=(1,), attention=attention)
            decoders[capacity, attention].warm_up()
    medians: dict = {key: [] for key in decoders}
    equal = {key: True for key in decoders}
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(repeats):
            for key, (tokens, seconds) in _interleaved_sweep(decoders, prompt, steps).items():
                medians[key].append(1e3 * statistics.median(seconds[skip:]))
                equal[key] &= tokens == reference
    return [
        {
            "capacity": capacity,
            "attention": attention,
            "median_ms": statistics.median(medians[capacity, attention]),
            "sweep_medians_ms": medians[capacity, attention],
            "tokens_equal": equal[capacity, attention],
        }
        for capacity, attention in decoders
    ]


def test_the_capacity_table_runs_every_decoder_to_the_reference_tokens():
    """The measuring helper (no numbers asserted here): rows per (capacity, attention), tokens as the reference."""
    model = tiny_decoder("qwen2", attn_implementation="sdpa")
    rows = capacity_table(
        model, capacities=(200,), attentions=("flex", "dense"), prefill=130, steps=4, skip=1, repeats=2
    )
    assert [(r["capacity"], r["attention"]) for r in rows] == [(200, "flex"), (200, "dense")]
    for row in rows:
        assert row["tokens_equal"] and len(row["sweep_medians_ms"]) == 2 and row["median_ms"] > 0
