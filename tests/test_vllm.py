"""The method on vLLM: in-process (AsyncLLM, and the offline LLM) and through vLLM's own OpenAI server, started here
on 127.0.0.1 and stopped here. On the embedded model, greedy and float32, answers equal parallel_decode /
normal_decode; a seeded sampled run reproduces.

Skipped where vLLM is not installed, except with PARALLEL_DECODING_REQUIRE_VLLM=1 (the vLLM CI leg), where a
missing vLLM fails. An engine starts in about a minute on a small CPU: one per module and kind.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

if os.environ.get("PARALLEL_DECODING_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (the vLLM leg: a missing vLLM is a failure, not a skip)
else:
    pytest.importorskip("vllm")

from test_tiny_model import MODEL_DIR  # noqa: E402

from parallel_decoding.completions.factory import make_client  # noqa: E402
from parallel_decoding.completions.method import normal_generate, parallel_generate  # noqa: E402
from parallel_decoding.completions.vllm_client import engine_args  # noqa: E402
from parallel_decoding.engine.decode import chat_prompt_ids, normal_decode, parallel_decode  # noqa: E402

ANSWER_KEYS = ("response", "length", "num_branches", "num_blocks", "stage1_response", "branches", "fallback", "caps")
NORMAL_KEYS = ("response", "length", "caps")
ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "seed": 0}
ROWS = (("data/retrieval_4.jsonl", 0), ("data/retrieval_10.jsonl", 0), ("data/retrieval_10.jsonl", 1))
MAX_NEW_TOKENS = 300
SERVER_START_S = 600


@pytest.fixture(scope="module", autouse=True)
def small_kv_cache():
    """A 1 GiB KV cache for the CPU engine (its default takes a large share of the machine's memory)."""
    previous = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    yield
    if previous is None:
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = previous


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: an AsyncLLM serves the loop it first ran on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def references():
    """The rows' prompt ids and the transformers engine's answers to them (greedy, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding.tasks import build_prompt, load_dataset, read_format_prompt

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    own_format = read_format_prompt(str(MODEL_DIR / "format_prompt.txt"))
    rows = []
    for path, index in ROWS:
        prompt = build_prompt(
            "retrieval", load_dataset("retrieval", str(MODEL_DIR.parents[1] / path))[index], own_format
        )
        rows.append(
            (
                chat_prompt_ids(tokenizer, prompt),
                parallel_decode(model, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS),
                normal_decode(model, tokenizer, prompt, max_new_tokens=MAX_NEW_TOKENS),
            )
        )
    return tokenizer, rows


@pytest.fixture(scope="module")
def in_process(loop, small_kv_cache):
    client = make_client("vllm", MODEL_DIR, ENGINE_ARGS)
    yield client
    loop.run_until_complete(client.aclose())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(small_kv_cache):
    """vLLM's OpenAI server on the embedded model, on 127.0.0.1 (development mode: it serves /reset_prefix_cache)."""
    import httpx2

    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL_DIR)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    command += ["--max-model-len", "2048", "--seed", "0", "--enable-prefix-caching"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM's server exited: {process.stderr.read()[-3000:]}")
            try:
                if httpx2.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM's server did not start within {SERVER_START_S} s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _check_answers(loop, client, references, streamed: bool = False) -> None:
    tokenizer, rows = references
    for prompt_ids, expected_parallel, expected_normal in rows:
        tokens: list[int] = []
        on_tokens = tokens.extend if streamed else None
        got = loop.run_until_complete(
            parallel_generate(client, tokenizer, prompt_ids, {"max_new_tokens": MAX_NEW_TOKENS}, on_tokens=on_tokens)
        )
        assert {k: got[k] for k in ANSWER_KEYS} == {k: expected_parallel[k] for k in ANSWER_KEYS}
        if streamed:
            assert tokenizer.decode(tokens, skip_special_tokens=True) == got["response"]
        got = loop.run_until_complete(
            normal_generate(client, tokenizer, prompt_ids, {"max_new_tokens": MAX_NEW_TOKENS}, on_tokens=on_tokens)
        )
        assert {k: got[k] for k in NORMAL_KEYS} == {k: expected_normal[k] for k in NORMAL_KEYS}


@pytest.fixture(scope="module")
def banned_first(references):
    """The first row's greedy first token and, with that token banned, the transformers client's first token."""
    from transformers import AutoModelForCausalLM

    from parallel_decoding.completions.interface import CompletionRequest, Sampling
    from parallel_decoding.completions.transformers_client import TransformersClient

    tokenizer, rows = references
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    client, prompt_ids = TransformersClient(model, tokenizer), rows[0][0]
    first = asyncio.run(client.complete(CompletionRequest(prompt_ids, 1, frozenset(), Sampling()))).token_ids[0]
    banned = CompletionRequest(prompt_ids, 1, frozenset(), Sampling(), frozenset({first}))
    return banned, asyncio.run(client.complete(banned)).token_ids


def _check_banned_first_token(loop, client, banned_first) -> None:
    """A banned id (the skeleton's first-token masks, as the method asks for them) is never written, and the token
    written instead is the transformers client's."""
    request, expected = banned_first
    assert loop.run_until_complete(client.complete(request)).token_ids == expected
    assert not request.banned_token_ids & set(expected)


def _check_sampled_run_reproduces(loop, client, references) -> None:
    tokenizer, rows = references
    settings = {"max_new_tokens": 120, "do_sample": True, "temperature": 1.5, "top_k": 20, "seed": 7}
    runs = [loop.run_until_complete(parallel_generate(client, tokenizer, rows[0][0], settings)) for _ in range(2)]
    assert {k: runs[0][k] for k in ANSWER_KEYS} == {k: runs[1][k] for k in ANSWER_KEYS}


def test_in_process_answers_equal_the_transformers_engine(loop, in_process, references, banned_first):
    assert in_process.name == "vllm" and in_process.context_length == 2048
    _check_banned_first_token(loop, in_process, banned_first)
    _check_answers(loop, in_process, references, streamed=True)
    loop.run_until_complete(in_process.reset_prefix_cache())
    _check_answers(loop, in_process, references)


def test_in_process_seeded_sampled_run_reproduces(loop, in_process, references):
    _check_sampled_run_reproduces(loop, in_process, references)


def test_http_answers_equal_the_transformers_engine(loop, server, references, banned_first):
    client = make_client("openai", MODEL_DIR, base_url=server)
    assert client.name == "openai" and client.context_length == 2048
    _check_banned_first_token(loop, client, banned_first)
    _check_answers(loop, client, references)
    loop.run_until_complete(client.reset_prefix_cache())
    _check_answers(loop, client, references, streamed=True)
    _check_sampled_run_reproduces(loop, client, references)
    loop.run_until_complete(client.aclose())


def test_offline_backend_answers_equal_the_transformers_engine(references, small_kv_cache, banned_first):
    loop = asyncio.new_event_loop()
    client = make_client("vllm", MODEL_DIR, ENGINE_ARGS, vllm_backend="offline")
    try:
        _check_banned_first_token(loop, client, banned_first)
        _check_answers(loop, client, references)
        loop.run_until_complete(client.reset_prefix_cache())
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()


def test_an_unknown_engine_argument_is_named():
    with pytest.raises(ValueError, match="unknown vLLM engine argument.*: no_such_arg"):
        engine_args({"tensor_parallel_size": 1, "no_such_arg": 3})
