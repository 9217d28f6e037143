"""The chat server on --engine vllm answers the official ``openai`` client with the answer ``parallel_decode`` gives
(the embedded model, float32, greedy), streamed and plain alike. The server runs on 127.0.0.1 and the test stops it.
Needs vLLM (see tests/test_vllm_generate.py for the skip rule)."""

from __future__ import annotations

import json
import os
import signal

import pytest

if os.environ.get("PARALLEL_DECODING_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (the vLLM leg: a missing vLLM is a failure, not a skip)
else:
    pytest.importorskip("vllm")

from parallel_decoding.runs.loading import DEFAULT_MODEL_PATH  # noqa: E402
from parallel_decoding.serve.launch import start_server  # noqa: E402
from parallel_decoding.tasks import build_prompt, load_dataset  # noqa: E402

MAX_TOKENS = 256
ROWS = 3


@pytest.fixture(scope="module")
def server():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_args = json.dumps({"max_model_len": 2048, "enforce_eager": True})
    proc, url = start_server(["--engine", "vllm", "--engine_args", engine_args], timeout=600)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except Exception:
            proc.kill()
            proc.wait(30)
            raise


@pytest.fixture(scope="module")
def references():
    """(prompt, parallel_decode's answer, normal_decode's answer) per row, on transformers in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding import normal_decode, parallel_decode

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    rows = load_dataset("retrieval", str(DEFAULT_MODEL_PATH.parents[1] / "data" / "retrieval_4.jsonl"))[:ROWS]
    prompts = [build_prompt("retrieval", row) for row in rows]
    return [
        (
            p,
            parallel_decode(model, tokenizer, p, max_new_tokens=MAX_TOKENS)["response"],
            normal_decode(model, tokenizer, p, max_new_tokens=MAX_TOKENS)["response"],
        )
        for p in prompts
    ]


def test_the_openai_client_gets_parallel_decodes_answer_streamed_and_plain(server, references):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    for prompt, parallel, normal in references:
        messages = [{"role": "user", "content": prompt}]
        plain = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert plain.choices[0].message.content == parallel
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == parallel
        sequential = client.chat.completions.create(
            model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"parallel": False}
        )
        assert sequential.choices[0].message.content == normal
