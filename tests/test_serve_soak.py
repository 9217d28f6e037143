"""A bounded soak of the server: a few hundred requests in a seeded random mix (normal and parallel, streamed and
not, clients that leave mid-stream, bad requests, a full queue), after which the server must answer a known
request exactly, hold nothing in flight, have every KV slot free, and not have grown past a stated memory bound.

One in-process server on 127.0.0.1; answers are kept short (a few tokens) so the soak takes about a minute on a
2-core CPU.
"""

from __future__ import annotations

import gc
import json
import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
psutil = pytest.importorskip("psutil")

import test_serve  # noqa: E402
from test_serve import WAIT_S, ServerThread, _ask, _raw, _streamed, _until  # noqa: E402

embedded, reference = test_serve.embedded, test_serve.reference  # the shared fixtures

SEED = 31
REQUESTS = 300
CLIENTS = 6
MAX_QUEUE = 6  # as many as the clients: a request of the mix finds the queue full only while a leaving one is counted
MEMORY_BOUND_MIB = 150  # the resident memory the soak may add (after a warm-up), allocator slack included
CHAT = "/v1/chat/completions"
BAD_BODIES = [
    (b'{"messages": [', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"9" * 5000 + b"}", {}, 400),
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', {}, 400),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', {"content-type": "text/plain"}, 415),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', {"origin": "http://evil.example"}, 403),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', {}, 400),
]


@pytest.fixture(scope="module")
def server(embedded):
    model, tokenizer, _ = embedded
    running = ServerThread(model, tokenizer, max_batch_size=4, kv_capacity=4096, max_queue=MAX_QUEUE)
    yield running
    running.stop()


def _plan(prompts: int) -> list[tuple]:
    """The seeded mix: (kind, prompt index, parallel, max_tokens) per request."""
    rng = random.Random(SEED)
    kinds = ["plain"] * 4 + ["stream"] * 3 + ["leave"] + ["bad"] * 2
    return [
        (rng.choice(kinds), rng.randrange(prompts), rng.random() < 0.5, rng.randint(2, 10)) for _ in range(REQUESTS)
    ]


def _one(server, prompts, request) -> tuple:
    """(kind, key, outcome) of one request of the mix; outcome is the answer's text, or an HTTP status."""
    kind, index, parallel, max_tokens = request
    key = (index, parallel, max_tokens)
    client = server.client()
    try:
        if kind == "plain":
            return kind, key, _ask(client, prompts[index], parallel, max_tokens).choices[0].message.content
        if kind == "stream":
            return kind, key, "".join(_streamed(client, prompts[index], parallel, max_tokens)[0])
        if kind == "leave":
            stream = _ask(client, prompts[index], parallel, 64, stream=True)
            next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
            stream.close()
            return kind, key, "left"
        body, headers, _ = BAD_BODIES[index % len(BAD_BODIES)]
        status, _, answer = _raw(server.url, CHAT, body, headers)
        assert answer["error"]["message"], answer
        return kind, key, status
    except openai.RateLimitError:
        return kind, key, 429
    except StopIteration:  # a leaving client whose answer ended before its first text
        return kind, key, "left"


def _rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_a_soak_of_mixed_requests_leaves_the_server_as_it_found_it(server, embedded, reference):
    prompts = embedded[2]
    for request in _plan(len(prompts))[:20]:  # warm-up: every path once before memory is measured
        _one(server, prompts, request)
    rss_before = _rss_mib()

    full_queue_status = _full_queue(server, prompts)
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(lambda r: _one(server, prompts, r), _plan(len(prompts)), timeout=600))

    answers = defaultdict(set)
    for kind, key, outcome in outcomes:
        if kind == "bad":
            body, headers, status = BAD_BODIES[key[0] % len(BAD_BODIES)]
            assert outcome in (status, 429), (body[:60], outcome)
        elif kind in ("plain", "stream") and outcome != 429:
            answers[key].add(outcome)
    assert full_queue_status == 429
    assert all(any(k == kind for k, _, _ in outcomes) for kind in ("plain", "stream", "leave", "bad"))
    assert sum(kind in ("plain", "stream") and outcome != 429 for kind, _, outcome in outcomes) > REQUESTS / 3
    # the same request always gets the same greedy answer, streamed or not, whatever else is in the batch
    assert all(len(texts) == 1 for texts in answers.values()), {k: v for k, v in answers.items() if len(v) > 1}

    _until(lambda: server.state.in_flight == 0 and server.state.preparing == 0, "requests stayed in flight")
    _until(server.slots_free, "KV slots stayed taken")
    status, _, health = _raw(server.url, "/health")
    load = [health[name] for name in ("running", "waiting", "in_flight", "preparing")]
    assert status == 200 and load == [0, 0, 0, 0]
    ref = reference(0, True, 160)
    assert _ask(server.client(), prompts[0], True, 160).choices[0].message.content == ref["response"]
    growth = _rss_mib() - rss_before
    assert growth < MEMORY_BOUND_MIB, f"the process grew by {growth:.0f} MiB over the soak"


def _full_queue(server, prompts) -> int:
    """The status of a request sent while MAX_QUEUE requests are held in flight (the engine paused)."""
    body = {"messages": [{"role": "user", "content": prompts[1]}], "max_tokens": 3}
    server.gate.open.clear()
    try:
        with ThreadPoolExecutor(MAX_QUEUE) as pool:
            held = [pool.submit(_raw, server.url, CHAT, body) for _ in range(MAX_QUEUE)]
            _until(lambda: server.state.in_flight == MAX_QUEUE, "the queue did not fill")
            status = _raw(server.url, CHAT, json.dumps(body).encode())[0]
            server.gate.open.set()
            assert [future.result(timeout=WAIT_S)[0] for future in held] == [200] * MAX_QUEUE
    finally:
        server.gate.open.set()
    return status
