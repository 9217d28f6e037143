"""The HTTP server (``parallel_decoding.serve``) on the embedded model, through the official ``openai`` client.

Servers run in this process (uvicorn in a thread, on 127.0.0.1 with an ephemeral port) or, for SIGTERM and the
command line, as a subprocess; every request count and wait is bounded, and every server is stopped at the end.
The reference answers are ``parallel_decode`` / ``normal_decode`` on the same user message (greedy, eager).
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from parallel_decoding import Engine, normal_decode, parallel_decode  # noqa: E402
from parallel_decoding.cli import UsageError  # noqa: E402
from parallel_decoding.serve.app import ServerState, create_app  # noqa: E402
from parallel_decoding.serve.launch import start_server  # noqa: E402
from parallel_decoding.serve.metrics import Metrics  # noqa: E402
from parallel_decoding.serve.protocol import finish_reason  # noqa: E402
from parallel_decoding.serve.server import bind, uvicorn_config  # noqa: E402
from parallel_decoding.serve.text import IncrementalText  # noqa: E402
from parallel_decoding.serve.worker import EngineWorker  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "tiny-qwen2-retrieval"
MODEL_ID = "tiny-qwen2-retrieval"
WAIT_S = 30  # the longest any single wait in these tests may take


# --- servers ------------------------------------------------------------------------------------------------------


class StepGate:
    """Wraps ``engine.step`` so a test can hold the engine between passes: cleared, the next pass waits."""

    def __init__(self, engine):
        self.open = threading.Event()
        self.open.set()
        step = engine.step

        def gated():
            assert self.open.wait(WAIT_S), "the step gate stayed closed"
            return step()

        engine.step = gated


class ServerThread:
    """An in-process server: an engine over the shared model, uvicorn in a thread on 127.0.0.1:<free port>."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size=16,
        kv_capacity=8192,
        max_queue=64,
        api_key=None,
        grace_s=5.0,
        limits=None,
        idle_timeout=5.0,
    ):
        import uvicorn

        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, kv_capacity=kv_capacity, compile=False)
        self.gate = StepGate(self.engine)
        metrics = Metrics()
        worker = EngineWorker(self.engine, metrics)
        self.state = ServerState(worker, metrics, tokenizer, MODEL_ID, max_queue=max_queue, api_key=api_key)
        if limits is not None:
            self.state.limits = limits
        self.socket = bind("127.0.0.1", 0)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(create_app(self.state), "warning", grace_s, idle_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        _until(lambda: self.server.started, "the server did not start")

    def client(self, api_key="unused", **kwargs):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=WAIT_S, **kwargs)

    def stop(self):
        self.gate.open.set()
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "the server thread did not stop"
        assert not self.state.worker.alive, "the engine's thread did not stop"

    def slots_free(self) -> bool:
        runner = self.engine.scheduler.runner
        return self.engine.idle and runner.allocator.free_slots == runner.capacity


def _until(condition, message, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def _raw(url, path, body=None, headers=None, method=None):
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=WAIT_S)
    payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(
        method or ("GET" if body is None else "POST"),
        path,
        body=payload,
        headers={"content-type": "application/json", **(headers or {})},
    )
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(data) if data else None


def _metric(url, name, **labels) -> float:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=WAIT_S)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name and (match.group(2) or "") == wanted:
            return float(match.group(3))
    return 0.0


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    """The embedded model and its retrieval prompts: the row, the task instruction, the model's own format prompt
    (what generate.py sends it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding.tasks import build_prompt, load_dataset, read_format_prompt

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    own_format = read_format_prompt(str(MODEL_DIR / "format_prompt.txt"))
    rows = load_dataset("retrieval", str(REPO / "data" / "retrieval_4.jsonl"))[:8]
    rows += load_dataset("retrieval", str(REPO / "data" / "retrieval_10.jsonl"))[:1]
    return model, tokenizer, [build_prompt("retrieval", row, own_format) for row in rows]


@pytest.fixture(scope="module")
def reference(embedded):
    """The answer of ``parallel_decode`` / ``normal_decode`` per (prompt index, mode, max_tokens), made once."""
    model, tokenizer, prompts = embedded
    cache = {}

    def answer(index, parallel, max_tokens):
        key = (index, parallel, max_tokens)
        if key not in cache:
            decode = parallel_decode if parallel else normal_decode
            cache[key] = decode(model, tokenizer, prompts[index], max_new_tokens=max_tokens)
        return cache[key]

    return answer


@pytest.fixture(scope="module")
def server(embedded):
    model, tokenizer, _ = embedded
    running = ServerThread(model, tokenizer)
    yield running
    running.stop()


def _ask(client, prompt, parallel, max_tokens, **kwargs):
    return client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        extra_body={"parallel": parallel},
        **kwargs,
    )


def _streamed(client, prompt, parallel, max_tokens, **kwargs):
    """(content deltas, the role of the first chunk, finish_reason, the last chunk's parallel_decoding)."""
    deltas, role, finish, info = [], None, None, None
    with _ask(client, prompt, parallel, max_tokens, stream=True, **kwargs) as stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            role = role or choice.delta.role
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish, info = choice.finish_reason, chunk.model_extra.get("parallel_decoding")
    return deltas, role, finish, info


def _same_as_reference(completion, ref):
    assert completion.choices[0].message.content == ref["response"]
    assert completion.choices[0].finish_reason == finish_reason(ref)
    assert completion.usage.prompt_tokens == ref["prompt_tokens"]
    assert completion.usage.completion_tokens == ref["length"]
    info = completion.model_extra["parallel_decoding"]
    assert info["steps"] == ref["steps"] and info["caps"] == ref["caps"] and info["fallback"] == ref.get("fallback")
    assert [(b["title"], b["tokens"], b["stop"]) for b in info["branches"]] == [
        (b["title"], b["tokens"], b["stop"]) for b in ref.get("branches", [])
    ]


# --- answers ------------------------------------------------------------------------------------------------------

CASES = [(0, 160), (1, 160), (8, 256), (2, 40)]  # (prompt, max_tokens): two rows, a 10-student row, a capped answer


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "normal"])
def test_answers_equal_the_decode_functions(server, embedded, reference, parallel):
    client = server.client()
    prompts = embedded[2]
    for index, max_tokens in CASES:
        ref = reference(index, parallel, max_tokens)
        _same_as_reference(_ask(client, prompts[index], parallel, max_tokens), ref)
    if parallel:
        assert reference(0, True, 160)["num_branches"] == 4  # the rows do decode in parallel
    assert finish_reason(reference(2, parallel, 40)) == "length"


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "normal"])
def test_streamed_answers_equal_non_streamed_ones(server, embedded, reference, parallel):
    client = server.client()
    prompts = embedded[2]
    for index, max_tokens in CASES:
        plain = _ask(client, prompts[index], parallel, max_tokens)
        deltas, role, finish, info = _streamed(client, prompts[index], parallel, max_tokens)
        assert role == "assistant" and len(deltas) > 1
        assert "".join(deltas) == plain.choices[0].message.content == reference(index, parallel, max_tokens)["response"]
        assert finish == plain.choices[0].finish_reason
        assert info["branches"] == plain.model_extra["parallel_decoding"]["branches"]


def test_stream_usage_chunk(server, embedded, reference):
    client = server.client()
    with _ask(client, embedded[2][0], True, 160, stream=True, stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference(0, True, 160)["length"]


def test_sixteen_concurrent_requests_each_get_their_batch_1_answer(server, embedded, reference):
    prompts = embedded[2]
    jobs = [(index, parallel) for index in range(8) for parallel in (True, False)]
    refs = {job: reference(*job, 80) for job in jobs}
    client = server.client()
    passes_before = _metric(server.url, "parallel_decoding_forward_passes_total")

    def run(job):
        index, parallel = job
        if index % 2:  # half of them streamed
            return "".join(_streamed(client, prompts[index], parallel, 80)[0])
        return _ask(client, prompts[index], parallel, 80).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(run, jobs, timeout=120))
    assert answers == [refs[job]["response"] for job in jobs]
    passes = _metric(server.url, "parallel_decoding_forward_passes_total") - passes_before
    assert passes < sum(ref["steps"] for ref in refs.values()) / 2  # the requests shared passes
    count = _metric(server.url, "parallel_decoding_batch_size_count")
    assert _metric(server.url, "parallel_decoding_batch_size_bucket", le="1.0") < count  # batches of more than 1
    assert _metric(server.url, "parallel_decoding_requests_total", mode="parallel", outcome="stop") >= 8


def test_sampling_follows_the_seed(server, embedded):
    model, tokenizer, prompts = embedded
    client = server.client()
    first = _ask(client, prompts[3], True, 120, temperature=0.9, seed=7)
    again = _ask(client, prompts[3], True, 120, temperature=0.9, seed=7)
    generator = torch.Generator(device=model.device).manual_seed(7)
    ref = parallel_decode(
        model, tokenizer, prompts[3], max_new_tokens=120, do_sample=True, temperature=0.9, generator=generator
    )
    assert first.choices[0].message.content == again.choices[0].message.content == ref["response"]
    assert first.model_extra["parallel_decoding"]["seed"] == 7


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    status, _, body = _raw(server.url, "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == MODEL_ID


# --- bad input ----------------------------------------------------------------------------------------------------

LONG_PROMPT = "Student GPA 3.59 inside the range. " * 400  # far more tokens than the model's 2048

BAD_BODIES = [
    (b'{"messages": [', 400, None),
    (b"\xff\xfe", 400, None),
    ([1, 2], 400, None),
    ({}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "   "}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2.5}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "parallel": "no"}, 400, "parallel"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_branches": 0}, 400, "max_branches"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["\n"]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": True}, 400, "seed"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}], "stream": True}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
]


def test_bad_requests_get_their_status_and_an_error_object(server, embedded, reference):
    for body, status, param in BAD_BODIES:
        got, _, answer = _raw(server.url, "/v1/chat/completions", body)
        assert got == status, (body if len(str(body)) < 200 else "long prompt", answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param, (body, error)
    got, _, answer = _raw(server.url, "/v1/no-such-route")
    assert got == 404 and answer["error"]["message"]
    _, _, answer = _raw(server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]})
    assert "the model's context is 2048" in answer["error"]["message"]
    assert answer["error"]["code"] == "context_length_exceeded"
    client = server.client()
    with pytest.raises(openai.BadRequestError) as raised:
        _ask(client, "hi", True, 0)
    assert raised.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        _ask(client, LONG_PROMPT, True, 10, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], n=2)
    # and the server goes on serving
    _same_as_reference(_ask(client, embedded[2][0], True, 160), reference(0, True, 160))


# --- cancellation, the arena, the queue, the key ------------------------------------------------------------------


def test_a_cancelled_stream_frees_its_slots(server, embedded, reference):
    prompts = embedded[2]
    client = server.client()
    cancelled = _metric(server.url, "parallel_decoding_requests_total", mode="parallel", outcome="cancelled")
    stream = _ask(client, prompts[4], True, 160, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # one token of text: the request is in the engine
    server.gate.open.clear()  # hold the engine after this pass, so the request cannot end on its own
    stream.close()
    _until(lambda: server.state.in_flight == 0, "the server did not see the client leave")
    server.gate.open.set()
    _until(server.slots_free, "the cancelled request's slots were not freed")
    assert (
        _metric(server.url, "parallel_decoding_requests_total", mode="parallel", outcome="cancelled") == cancelled + 1
    )
    _same_as_reference(_ask(client, prompts[4], True, 160), reference(4, True, 160))
    assert server.slots_free()


@pytest.fixture(scope="module")
def small_server(embedded):
    """Two requests at a time, at most two in flight, a 600-slot arena, and an API key."""
    model, tokenizer, _ = embedded
    running = ServerThread(model, tokenizer, max_batch_size=2, kv_capacity=600, max_queue=2, api_key="s3cret-key")
    yield running
    running.stop()


def test_the_api_key_is_required_and_checked(small_server, embedded):
    status, _, body = _raw(small_server.url, "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError) as raised:
        small_server.client(api_key="wrong").models.list()
    assert raised.value.status_code == 401 and "wrong" not in str(raised.value)
    with pytest.raises(openai.AuthenticationError):
        _ask(small_server.client(api_key="wrong"), "hi", True, 5)
    assert _raw(small_server.url, "/health")[0] == 200  # health and metrics need no key
    answer = _ask(small_server.client(api_key="s3cret-key"), embedded[2][0], False, 20)
    assert answer.usage.completion_tokens == 20


def test_a_prompt_larger_than_the_arena_is_refused(small_server, embedded):
    client = small_server.client(api_key="s3cret-key")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as raised:
            if stream:
                list(_ask(client, embedded[2][0], True, 500, stream=True))
            else:
                _ask(client, embedded[2][0], True, 500)
        error = raised.value.body
        assert error["code"] == "kv_capacity_exceeded" and "the arena holds 600" in error["message"], error
    assert _ask(client, embedded[2][0], True, 30).usage.completion_tokens == 30  # still serving


def test_a_full_queue_answers_429_with_retry_after(small_server, embedded):
    key = {"authorization": "Bearer s3cret-key"}
    body = {"messages": [{"role": "user", "content": embedded[2][1]}], "max_tokens": 30}
    small_server.gate.open.clear()  # no pass runs: what is submitted stays in flight
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(_raw, small_server.url, "/v1/chat/completions", body, key) for _ in range(2)]
        _until(lambda: small_server.state.in_flight == 2, "two requests did not get in flight")
        status, headers, answer = _raw(small_server.url, "/v1/chat/completions", body, key)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert answer["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            _ask(small_server.client(api_key="s3cret-key"), "hi", True, 5)
        small_server.gate.open.set()
        results = [future.result(timeout=WAIT_S) for future in held]
    assert [status for status, _, _ in results] == [200, 200]
    assert results[0][2]["choices"][0]["message"] == results[1][2]["choices"][0]["message"]
    _until(lambda: small_server.state.in_flight == 0 and small_server.slots_free(), "the queue did not drain")


def test_stopping_cancels_what_outlives_the_grace_time(embedded):
    model, tokenizer, prompts = embedded
    running = ServerThread(model, tokenizer, grace_s=0.5)
    try:
        stream = _ask(running.client(), prompts[6], False, 160, stream=True)
        next(chunk for chunk in stream if chunk.choices and chunk.choices[0].delta.content)
        running.gate.open.clear()  # the answer cannot finish within the grace time
        running.server.should_exit = True
        with pytest.raises(openai.APIError, match="the server stopped before the answer was finished"):
            list(stream)
        running.gate.open.set()
        running.thread.join(WAIT_S)
        assert not running.thread.is_alive() and not running.state.worker.alive
        assert running.slots_free()  # the cancelled request's slots went back
    finally:
        running.stop()


# --- detokenization -----------------------------------------------------------------------------------------------


def test_incremental_text_holds_back_incomplete_characters(qwen_tokenizer):
    text = "Plan: 北京 → 上海 🚄🚄, then «café» naïve 😀!\n####Ü: ok"
    ids = qwen_tokenizer.encode(text)
    assert any("\ufffd" in qwen_tokenizer.decode(ids[:i]) for i in range(len(ids)))  # some tokens split a character
    for step in (1, 2, 3):
        stream = IncrementalText(qwen_tokenizer)
        deltas = [stream.add(ids[i : i + step]) for i in range(0, len(ids), step)]
        deltas.append(stream.finish(qwen_tokenizer.decode(ids, skip_special_tokens=True)))
        assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


# --- the command line ---------------------------------------------------------------------------------------------


def test_bad_flags_are_one_line_and_exit_2():
    from parallel_decoding.serve.__main__ import parse_args

    for argv in (
        ["--port", "x"],
        ["--max_batch_size", "0"],
        ["--max_queue", "0"],
        ["--kv_capacity", "-1"],
        ["--compile", "maybe"],
        ["--api_key", " "],
        ["--port", "70000"],
    ):
        with pytest.raises(UsageError):
            parse_args(argv)
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_decoding.serve", "--max_batch_size", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--max_batch_size must be >= 1" in proc.stderr


def _start_subprocess(*flags):
    return start_server(["--compile", "off", *flags], timeout=120)


def test_sigterm_finishes_the_request_in_flight_and_exits_0(embedded, reference):
    proc, url = _start_subprocess("--shutdown_timeout", "20")
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S)
        deltas = []
        with _ask(client, embedded[2][5], False, 120, stream=True) as stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas.append(chunk.choices[0].delta.content)
                    if len(deltas) == 1:
                        proc.send_signal(signal.SIGTERM)  # mid-answer
        assert "".join(deltas) == reference(5, False, 120)["response"]  # the answer in flight was finished
        assert proc.wait(WAIT_S) == 0
        with pytest.raises(openai.APIConnectionError):  # and nothing listens any more
            client.models.list()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT_S)
