"""eval.py, parallel_decoding.evaluation.judge and parallel_decoding.evaluation.metrics.

The judge tests talk to a real HTTP server on 127.0.0.1 (ephemeral port, http.server in a thread) that speaks the
OpenAI chat-completions API and is scripted per test, through the real ``openai`` client. No other network.
"""

import http.server
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

import eval as eval_cli
from parallel_decoding.evaluation import judge as judge_mod
from parallel_decoding.evaluation import metrics
from parallel_decoding.evaluation import report as report_mod

REPO = pathlib.Path(__file__).resolve().parents[1]
KEY = "sk-test-SECRET-key-0123456789abcdef"


# ---------------------------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server


def completion(content, status=200, headers=None, delay=0.0):
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "judge-test",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return status, body, headers or {}, delay


def error_reply(status, message="scripted failure", headers=None, delay=0.0):
    return status, {"error": {"message": message, "type": "server_error", "code": None}}, headers or {}, delay


class JudgeServer:
    """``respond(index, request_body, request_headers) -> (status, body, headers, delay)``; records every request
    (header names lower-cased)."""

    def __init__(self, respond):
        self.respond = respond
        self.requests = []  # (arrival time, body, headers)
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                request_headers = {name.lower(): value for name, value in self.headers.items()}
                with server.lock:
                    index = len(server.requests)
                    server.requests.append((time.monotonic(), body, request_headers))
                status, reply, headers, delay = server.respond(index, body, request_headers)
                if delay:
                    time.sleep(delay)
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.httpd.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @property
    def count(self):
        with self.lock:
            return len(self.requests)

    def user_messages(self):
        with self.lock:
            return [body["messages"][-1]["content"] for _, body, _ in self.requests]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def answer_section(user_message):
    """The graded answer inside a judge prompt (English or Chinese)."""
    for marker in ("[Assistant's answer]", "【助手的回答】"):
        if marker in user_message:
            return user_message.split(marker, 1)[1]
    raise AssertionError("no answer section in the judge prompt")


def grade_by_mode(index, body, headers):
    """Parallel answers get 3, normal answers 4 (the test rows mark their answers)."""
    answer = answer_section(body["messages"][-1]["content"])
    if "PARALLEL" in answer:
        return completion("Rationale: covers most points.\nScore: 3")
    return completion("Rationale: complete and correct.\nScore: 4")


@pytest.fixture(autouse=True)
def no_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


# ---------------------------------------------------------------------------------------------------------------------
# Result files


def planning_rows(n, chinese=()):
    rows = []
    for i in range(n):
        zh = i in chinese
        rows.append(
            {
                "task": f"请分析方案{i}的成本、风险和收益。" if zh else f"Analyse plan {i}: cost, risk and benefit.",
                "answer": f"reference analysis {i}",
                "normal_response": f"NORMAL answer {i}",
                "normal_time": 2.0 + i,
                "normal_length": 100 + i,
                "parallel_response": f"####Cost: ...\n####Risk: ...\n####%%%%\nPARALLEL answer {i}",
                "parallel_time": 1.0 + i,
                "parallel_length": 90 + i,
                "fallback": None,
                "error": None,
            }
        )
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge_args(path, server, task="planning", *extra):
    return [
        "--df_path",
        str(path),
        "--task",
        task,
        "--api_key",
        KEY,
        "--base_url",
        server.url,
        "--model_name",
        "judge-test",
        "--backoff_base",
        "0.01",
        *extra,
    ]


def assert_key_nowhere(folder, *texts):
    for file in pathlib.Path(folder).rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), f"API key written to {file}"
    for text in texts:
        assert KEY not in text


def make_judge(server, **kwargs):
    kwargs.setdefault("backoff_base", 0.01)
    return judge_mod.Judge("judge-test", KEY, server.url, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Judge: scoring, retries, parsing


def test_judge_scores_rows_and_stores_them(tmp_path, capsys):
    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(3, chinese={1}))
    with JudgeServer(grade_by_mode) as server:
        assert eval_cli.main(judge_args(path, server, "planning", "--concurrency", "3")) == 0
        messages = server.user_messages()
        auth = {headers.get("authorization") for _, _, headers in server.requests}
        models = {body["model"] for _, body, _ in server.requests}
    assert len(messages) == 6  # one request per answer
    assert auth == {f"Bearer {KEY}"} and models == {"judge-test"}
    # Chinese prompt exactly for the Chinese row's two answers, with question and reference inside.
    chinese = [m for m in messages if "评分标准" in m]
    assert len(chinese) == 2 and all("方案1" in m and "reference analysis 1" in m for m in chinese)
    assert all("Analyse plan" in m for m in messages if m not in chinese)

    rows = read_jsonl(path)
    assert [r["normal_score"] for r in rows] == [4, 4, 4]
    assert [r["parallel_score"] for r in rows] == [3, 3, 3]
    assert rows[0]["normal_rationale"] == "complete and correct."
    assert rows[0]["parallel_rationale"] == "covers most points."
    assert rows[0]["task"] == planning_rows(1)[0]["task"]  # dataset columns kept

    summary = json.loads((tmp_path / "plan.summary.json").read_text())
    assert summary["normal_score"] == 4.0 and summary["parallel_score"] == 3.0
    assert summary["judged_rows"] == 3 and summary["judge_model"] == "judge-test"
    assert (tmp_path / "plan.summary.md").read_text().count("judge score") == 1
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr()
    assert "judge score (1-5, mean)" in out.out
    assert_key_nowhere(tmp_path, out.out, out.err)


def test_server_error_then_success(tmp_path):
    def respond(index, body, headers):
        return error_reply(500) if index == 0 else completion("Rationale: fine.\nScore: 5")

    with JudgeServer(respond) as server:
        verdict = make_judge(server).grade("q", "ref", "ans")
        assert server.count == 2
    assert verdict.score == 5 and verdict.rationale == "fine."


def test_rate_limit_backs_off_exponentially():
    def respond(index, body, headers):
        return error_reply(429, "slow down") if index < 2 else completion("Score: 2")

    with JudgeServer(respond) as server:
        verdict = make_judge(server, backoff_base=0.15).grade("q", "ref", "ans")
        times = [t for t, _, _ in server.requests]
    assert verdict.score == 2 and len(times) == 3
    assert times[1] - times[0] >= 0.15  # base
    assert times[2] - times[1] >= 0.30  # base * 2


def test_rate_limit_honours_retry_after():
    def respond(index, body, headers):
        return error_reply(429, headers={"Retry-After": "0.4"}) if index == 0 else completion("Score: 4")

    with JudgeServer(respond) as server:
        assert make_judge(server, backoff_base=0.001).grade("q", "ref", "ans").score == 4
        times = [t for t, _, _ in server.requests]
    assert times[1] - times[0] >= 0.4


def test_timeout_is_retried():
    def respond(index, body, headers):
        return completion("Score: 3", delay=1.5) if index == 0 else completion("Score: 3")

    with JudgeServer(respond) as server:
        assert make_judge(server, timeout=0.3).grade("q", "ref", "ans").score == 3
        assert server.count == 2


def test_retries_exhausted_raises():
    with JudgeServer(lambda i, b, h: error_reply(503)) as server:
        with pytest.raises(judge_mod.JudgeError, match=r"after 3 attempts: InternalServerError \(HTTP 503\)"):
            make_judge(server, max_retries=2).grade("q", "ref", "ans")
        assert server.count == 3


def test_non_retryable_error_fails_at_once_without_the_key():
    # A server that echoes the credentials in its error body must not get the key into our messages.
    def respond(index, body, headers):
        return error_reply(401, f"invalid key {headers.get('authorization')}")

    with JudgeServer(respond) as server:
        with pytest.raises(judge_mod.JudgeError) as info:
            make_judge(server).grade("q", "ref", "ans")
        assert server.count == 1
    assert "HTTP 401" in str(info.value) and KEY not in str(info.value) and "***" in str(info.value)


def test_cli_judge_failure_saves_and_hides_key(tmp_path, capsys):
    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(2))
    with JudgeServer(lambda i, b, h: error_reply(401, f"bad {h.get('authorization')}")) as server:
        assert eval_cli.main(judge_args(path, server, "planning", "--concurrency", "1")) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "rerun" in err
    assert not (tmp_path / "plan.summary.json").exists()
    assert_key_nowhere(tmp_path, err)


def test_garbage_verdict_retried_then_missing(tmp_path, capsys):
    def respond(index, body, headers):
        answer = answer_section(body["messages"][-1]["content"])
        if "answer 0" in answer and "PARALLEL" in answer:
            return completion("I would rather talk about turtles. Score: excellent!")
        return completion("Rationale: ok.\nScore: 5")

    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(2))
    with JudgeServer(respond) as server:
        assert eval_cli.main(judge_args(path, server, "planning", "--concurrency", "1")) == 0
        assert server.count == 4 + 1  # the garbage verdict asked twice
    rows = read_jsonl(path)
    assert rows[0]["parallel_score"] is None
    assert rows[0]["parallel_rationale"].startswith("unparseable verdict: I would rather talk about turtles")
    assert [rows[0]["normal_score"], rows[1]["normal_score"], rows[1]["parallel_score"]] == [5, 5, 5]
    summary = json.loads((tmp_path / "plan.summary.json").read_text())
    assert summary["parallel_score"] == 5.0  # missing is not 0: mean over the one parsed verdict
    assert summary["parallel_scored"] == 1 and summary["normal_scored"] == 2 and summary["judged_rows"] == 1


def test_resume_after_server_dies_asks_only_for_missing(tmp_path, capsys):
    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(5))
    healthy_requests = 5

    def dying(index, body, headers):
        return grade_by_mode(index, body, headers) if index < healthy_requests else error_reply(502)

    with JudgeServer(dying) as server:
        args = judge_args(path, server, "planning", "--concurrency", "1", "--save_every", "2", "--max_retries", "1")
        assert eval_cli.main(args) == 1
        assert server.count == healthy_requests + 2  # the failing answer: 1 try + 1 retry, then stop
    rows = read_jsonl(path)
    scored = sum(r.get(f"{m}_score") is not None for r in rows for m in metrics.MODES)
    assert scored == healthy_requests  # nothing lost, though the last save point was passed
    assert not (tmp_path / "plan.summary.json").exists()

    with JudgeServer(grade_by_mode) as server:
        assert eval_cli.main(judge_args(path, server, "planning", "--concurrency", "2")) == 0
        assert server.count == 10 - healthy_requests  # only the missing answers
    rows = read_jsonl(path)
    assert [(r["normal_score"], r["parallel_score"]) for r in rows] == [(4, 3)] * 5

    with JudgeServer(grade_by_mode) as server:  # everything judged: no request at all
        assert eval_cli.main(judge_args(path, server, "planning")) == 0
        assert server.count == 0
        assert eval_cli.main(judge_args(path, server, "planning", "--rejudge", "--max_rows", "2")) == 0
        assert server.count == 4


def test_max_rows_limits_judging_and_summary(tmp_path, capsys):
    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(4))
    with JudgeServer(grade_by_mode) as server:
        assert eval_cli.main(judge_args(path, server, "planning", "--max_rows", "2")) == 0
        assert server.count == 4
    rows = read_jsonl(path)
    assert len(rows) == 4 and "normal_score" not in rows[2]
    summary = json.loads((tmp_path / "plan.summary.json").read_text())
    assert summary["rows"] == 2 and summary["judged_rows"] == 2


def test_cli_end_to_end_subprocess_with_env_key(tmp_path):
    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(3, chinese={2}))
    with JudgeServer(grade_by_mode) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": server.url}
        proc = subprocess.run(
            [sys.executable, "eval.py", "--df_path", str(path), "--task", "planning", "--model_name", "judge-test"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert server.count == 6
    assert "speedup" in proc.stdout and "judge score" in proc.stdout
    summary = json.loads((tmp_path / "plan.summary.json").read_text())
    assert summary["normal_score"] == 4.0 and summary["parallel_score"] == 3.0
    assert {"plan.jsonl", "plan.summary.json", "plan.summary.md", "plan.png"} <= {p.name for p in tmp_path.iterdir()}
    assert_key_nowhere(tmp_path, proc.stdout, proc.stderr)


def test_ctrl_c_saves_every_verdict_received_and_rerun_resumes(tmp_path, capsys):
    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(3))
    release = threading.Event()

    def stalls_after_three(index, body, headers):
        if index >= 3:
            release.wait(20)
        return grade_by_mode(index, body, headers)

    with JudgeServer(stalls_after_three) as server:
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        proc = subprocess.Popen(
            [
                sys.executable,
                "eval.py",
                "--df_path",
                str(path),
                "--task",
                "planning",
                "--base_url",
                server.url,
                "--concurrency",
                "1",
                "--save_every",
                "100",
            ],  # no periodic save before the interrupt
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while server.count < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.count == 4
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            release.set()  # let the request in flight finish so the process can exit
            out, err = proc.communicate(timeout=30)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, err
        assert "interrupted; the verdicts received so far are saved" in err
        assert server.count == 4  # the queued answers were never sent
    rows = read_jsonl(path)
    assert sum(r.get(f"{m}_score") is not None for r in rows for m in metrics.MODES) == 3
    assert_key_nowhere(tmp_path, out, err)
    with JudgeServer(grade_by_mode) as server:  # the rerun asks only for the three missing answers
        assert eval_cli.main(judge_args(path, server, "planning")) == 0
        assert server.count == 3
    assert all(r["normal_score"] == 4 and r["parallel_score"] == 3 for r in read_jsonl(path))


# ---------------------------------------------------------------------------------------------------------------------
# Verdict parsing


@pytest.mark.parametrize(
    "text, score",
    [
        ("Rationale: fine.\nScore: 4", 4),
        ("**Score:** 5/5", 5),
        ("理由：基本正确。\n评分：3", 3),
        ("分数: 2 分", 2),
        ('{"rationale": "ok", "score": 4}', 4),
        ('```json\n{"score": 1, "rationale": "wrong"}\n```', 1),
        ("My verdict: [[2]]", 2),
        ("I'd give it 4 out of 5.", 4),
        ("Score: 2 at first glance... on reflection, Score: 3", 3),
        ("Score: 4.5", 4.5),
        ("Score: 7", None),
        ("Score: 0", None),
        ("I like turtles", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(text, score):
    assert judge_mod.parse_score(text) == score


def test_parse_rationale():
    assert judge_mod.parse_rationale("Rationale: short and right.\nScore: 5") == "short and right."
    assert judge_mod.parse_rationale("理由：正确。\n评分：5") == "正确。"
    assert judge_mod.parse_rationale("Clear answer.\nScore: 4") == "Clear answer."


def test_prompt_language_follows_question():
    en = judge_mod.build_messages("Which city?", "Paris", "Paris")
    zh = judge_mod.build_messages("哪个城市？", "巴黎", "巴黎")
    assert "Score: <an integer from 1 to 5>" in en[1]["content"] and "[Question]\nWhich city?" in en[1]["content"]
    assert "评分：<1 到 5 的整数>" in zh[1]["content"] and "【问题】\n哪个城市？" in zh[1]["content"]


def test_client_does_not_retry_by_itself():
    judge = judge_mod.Judge("m", KEY, "http://127.0.0.1:9/v1")
    assert judge.client.max_retries == 0


def test_backoff_delay_grows_and_is_capped():
    judge = judge_mod.Judge("m", KEY, "http://127.0.0.1:9/v1", backoff_base=1.0, backoff_max=5.0)
    assert 1.0 <= judge.backoff_delay(0) <= 1.25
    assert 4.0 <= judge.backoff_delay(2) <= 5.0
    assert judge.backoff_delay(10) == 5.0


# ---------------------------------------------------------------------------------------------------------------------
# Speed arithmetic (--no_judge), on a file shaped like the reference's


def reference_retrieval_rows():
    # Hand-picked numbers: tokens/s normal 20, 30, 10 -> mean 20; parallel 40, 50, 30 -> mean 40; speedup 2.0;
    # time ratios 10/4 = 2.5, 5/5 = 1.0, 8/2 = 4.0 -> mean 2.5; mean times 23/3 and 11/3.
    return [
        {
            "prompt": "Which student has a GPA between 3.5 and 3.6?",
            "gold_keys": "Fatima Larsen",
            "gold_values": "3.59",
            "normal_response": "Checking each...\nFinal answer: Fatima Larsen",
            "normal_time": 10.0,
            "normal_length": 200,
            "parallel_response": "####A: ...\n####%%%%\nFinal answer: **Fatima Larsen.**",
            "parallel_time": 4.0,
            "parallel_length": 160,
        },
        {
            "prompt": "Which student has a GPA between 2.0 and 2.1?",
            "gold_keys": "Uma Jensen",
            "gold_values": "2.06",
            "normal_response": "Final answer: Paula Singh",
            "normal_time": 5.0,
            "normal_length": 150,
            "parallel_response": "final answer: uma jensen",
            "parallel_time": 5.0,
            "parallel_length": 250,
        },
        {
            "prompt": "Which student has a GPA between 3.7 and 3.9?",
            "gold_keys": "Farah Romano",
            "gold_values": "3.80",
            "normal_response": "It is Farah Romano",
            "normal_time": 8.0,
            "normal_length": 80,
            "parallel_response": "Final answer: Farah Romano\nFinal answer: Uma Jensen",
            "parallel_time": 2.0,
            "parallel_length": 60,
        },
    ]


def test_no_judge_reference_speed_arithmetic(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ref.jsonl", reference_retrieval_rows())
    before = path.read_bytes()
    assert eval_cli.main(["--df_path", str(path), "--task", "retrieval", "--no_judge"]) == 0
    assert path.read_bytes() == before  # --no_judge never rewrites the results
    s = json.loads((tmp_path / "ref.summary.json").read_text())
    assert s["rows"] == 3 and s["speed_rows"] == 3 and s["error_rows"] == 0 and s["fallback_rows"] == 0
    assert s["normal_time"] == pytest.approx(23 / 3) and s["parallel_time"] == pytest.approx(11 / 3)
    assert s["normal_length"] == pytest.approx(430 / 3) and s["parallel_length"] == pytest.approx(470 / 3)
    assert s["normal_speed"] == pytest.approx(20.0) and s["parallel_speed"] == pytest.approx(40.0)
    assert s["speedup"] == pytest.approx(2.0) and s["time_ratio"] == pytest.approx(2.5)
    # EM: normal right on row 1 only ("It is Farah Romano" is the last line, not the name); parallel right on 1, 2
    # (row 3's LAST final answer is the wrong name).
    assert s["normal_accuracy"] == pytest.approx(1 / 3) and s["parallel_accuracy"] == pytest.approx(2 / 3)
    assert "normal_score" not in s and "normal_f1" not in s
    out = capsys.readouterr().out
    assert "speedup (mean parallel tokens/s / mean normal tokens/s): 2.00x" in out
    assert "mean per-row time ratio (normal_time / parallel_time): 2.50x" in out
    assert (tmp_path / "ref.png").exists() and (tmp_path / "ref.summary.md").exists()
    # the reference records no caps: counts unknown, not zero
    assert s["capped_rows"] is None and s["uncapped_rows"] is None and s["uncapped_speedup"] is None
    assert "caps: not recorded in this file" in out


def test_speedup_over_rows_neither_mode_capped(tmp_path, capsys):
    rows = reference_retrieval_rows()  # per-row tokens/s normal 20, 30, 10; parallel 40, 50, 30
    rows[0].update(normal_caps=["the answer reached max_new_tokens (200)"], parallel_caps=[])
    rows[1].update(normal_caps=[], parallel_caps=["block 0: the branches used the answer's budget"])
    rows[2].update(normal_caps=[], parallel_caps=[])
    path = write_jsonl(tmp_path / "capped.jsonl", rows)
    assert eval_cli.main(["--df_path", str(path), "--task", "retrieval", "--no_judge"]) == 0
    s = json.loads((tmp_path / "capped.summary.json").read_text())
    assert s["speedup"] == pytest.approx(2.0)  # all rows
    assert (s["normal_capped"], s["parallel_capped"], s["capped_rows"], s["uncapped_rows"]) == (1, 1, 2, 1)
    assert s["uncapped_speedup"] == pytest.approx(30 / 10)  # row 3 only
    out = capsys.readouterr().out
    assert "rows capped in either mode: 2; speedup over the 1 rows neither mode capped: 3.00x" in out
    assert any(line.split() == ["answers", "capped", "(rows)", "1", "1"] for line in out.splitlines())
    # a results file of this version with one mode only: caps of that mode
    for row in rows:
        for column in ("parallel_response", "parallel_time", "parallel_length", "parallel_caps"):
            row.pop(column)
    s = metrics.speed_summary(rows)
    assert (s["normal_capped"], s["parallel_capped"], s["uncapped_rows"], s["uncapped_speedup"]) == (1, None, 2, None)


def test_error_rows_leave_the_means_and_fallbacks_are_counted(tmp_path):
    rows = reference_retrieval_rows()
    rows[0].update(fallback="no parallel block", error=None)
    rows[1].update(fallback=None, error="CUDA out of memory", normal_time=0.5, parallel_time=None)
    rows[2].update(fallback="", error="")
    s = metrics.speed_summary(rows)
    assert (s["rows"], s["speed_rows"], s["error_rows"], s["fallback_rows"]) == (3, 2, 1, 1)
    assert s["normal_speed"] == pytest.approx(15.0) and s["parallel_speed"] == pytest.approx(35.0)
    assert s["speedup"] == pytest.approx(35 / 15) and s["time_ratio"] == pytest.approx((2.5 + 4.0) / 2)
    assert metrics.answer_metrics(rows, "retrieval")["normal_metric_rows"] == 2


def test_format_adherence_and_fallback_reasons(tmp_path, capsys):
    """Adherence: rows (no error, a parallel answer) that wrote a closed block, from num_parallel_branches where the
    engine recorded it, else from the answer text; fallback reasons counted by kind over every fallback row."""
    no_block = "the model wrote no ####Title: block; decoded sequentially"
    unclosed = "the model opened a #### block but did not close it with ####%%%%; decoded sequentially"
    rows = reference_retrieval_rows()  # the reference's files: no engine columns, read from the text
    rows[0]["parallel_response"] = "Checking.\n####Ann: GPA 3.1, outside.\n####Bo: GPA 3.5, inside.\n####%%%%\nBo"
    rows[1]["parallel_response"] = "####Ann: GPA 3.1, outside.\n####Bo: inside\nFinal answer: Bo"  # never closed
    rows[2]["parallel_response"] = "####%%%%\nFinal answer: Bo"  # closed, but no step
    engine_rows = [
        dict(rows[0], num_parallel_branches=n, fallback=f, error=e, parallel_response=r)
        for n, f, e, r in [
            (2, None, None, "x"),  # the engine's record decides, not the text
            (0, no_block, None, "Bo"),
            (0, unclosed, None, "####Ann: ...\n####%%%%\nBo"),  # decoded sequentially after an unclosed skeleton
            (3, unclosed, None, "a later block never closed"),
            (0, "the model got bored; decoded sequentially", None, "Bo"),
            (None, None, "parallel: RuntimeError: boom", None),  # an error row: not counted in adherence
        ]
    ]
    s = metrics.format_summary(rows)
    assert (s["format_rows"], s["format_adherent_rows"], s["fallback_reasons"]) == (3, 1, {})
    assert s["format_adherence"] == pytest.approx(1 / 3)
    s = metrics.format_summary(engine_rows)
    assert (s["format_rows"], s["format_adherent_rows"]) == (5, 2) and s["format_adherence"] == pytest.approx(0.4)
    assert s["fallback_reasons"] == {"no_block": 1, "the model got bored": 1, "unclosed_block": 2}
    assert metrics.format_summary([{"normal_response": "x", "error": None}]) == {}  # --modes normal: no figure

    path = write_jsonl(tmp_path / "run.jsonl", engine_rows)
    assert eval_cli.main(["--df_path", str(path), "--task", "retrieval", "--no_judge"]) == 0
    out = capsys.readouterr().out
    assert "format adherence (closed block)" in out and "2/5 (40.0 %)" in out
    assert "fallback reasons: no_block 1, the model got bored 1, unclosed_block 2" in out
    saved = json.loads((tmp_path / "run.summary.json").read_text())
    assert saved["format_adherence"] == pytest.approx(0.4) and saved["fallback_reasons"]["unclosed_block"] == 2


def test_qa_metrics_on_longbench_rows(tmp_path):
    rows = [
        {
            "input": "Who directed X?",
            "context": "...",
            "answers": ["John Smith"],
            "_id": "a",
            "normal_response": "Final answer: John Smith.",
            "normal_time": 1.0,
            "normal_length": 10,
            "parallel_response": "Final answer: Smith",
            "parallel_time": 1.0,
            "parallel_length": 10,
        },
        {
            "input": "Where was Y born?",
            "context": "...",
            "answers": ["Paris", "Paris, France"],
            "_id": "b",
            "normal_response": "Final answer: the city of Lyon",
            "normal_time": 1.0,
            "normal_length": 10,
            "parallel_response": "Final answer: Paris, France",
            "parallel_time": 1.0,
            "parallel_length": 10,
        },
    ]
    m = metrics.answer_metrics(rows, "multi-document-qa")
    assert m["normal_accuracy"] == 0.5 and m["parallel_accuracy"] == 0.5
    assert m["normal_f1"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["parallel_f1"] == pytest.approx((2 / 3 + 1.0) / 2)  # "smith" vs "john smith": P 1, R 1/2


# ---------------------------------------------------------------------------------------------------------------------
# Final answer, EM, F1


@pytest.mark.parametrize(
    "response, final",
    [
        ("reasoning\nFinal answer: Alice Smith", "Alice Smith"),
        ("Final answer: Bob\nmore text\nFINAL ANSWER: Alice", "Alice"),
        ("**Final answer:** `Alice`", "Alice"),
        ("Final Answer:\n\n  Alice Smith  \n", "Alice Smith"),
        ("推理……\n最终答案：张三", "张三"),
        ("first line\nthe last line\n\n", "the last line"),
        ("Final answer:", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_extract_final_answer(response, final):
    assert metrics.extract_final_answer(response) == final


def test_normalize_and_em():
    assert metrics.normalize_answer("  The  Eiffel-Tower!! ") == "eiffel tower"
    assert metrics.normalize_answer("An apple, a day.") == "apple day"
    assert metrics.normalize_answer("“北京”。") == "北京"
    assert metrics.exact_match("the Beatles", "Beatles") == 1.0
    assert metrics.exact_match("Beatles band", "Beatles") == 0.0


def test_token_f1():
    assert metrics.token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P 2/2, R 2/3
    assert metrics.token_f1("dog", "cat") == 0.0
    assert metrics.token_f1("", "cat") == 0.0
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("北京大学", "北京") == pytest.approx(2 / 3)  # Chinese characters are tokens


def test_retrieval_exact_match():
    assert metrics.retrieval_exact_match("Final answer: fatima larsen.", "Fatima Larsen") == 1.0
    assert metrics.retrieval_exact_match("Final answer: Fatima", "Fatima Larsen") == 0.0
    assert metrics.retrieval_exact_match("Final answer: Bo Li and Ann Wu", ["Ann Wu", "Bo Li"]) == 1.0
    assert metrics.retrieval_exact_match("Final answer: Bo Li", ["Ann Wu", "Bo Li"]) == 0.0
    assert metrics.retrieval_exact_match("Final answer: Bo Li", ["Bo Li"]) == 1.0
    with pytest.raises(ValueError, match="no gold_keys"):
        metrics.retrieval_exact_match("x", None)


def test_qa_scores_take_the_best_answer():
    assert metrics.qa_scores("Final answer: Paris", ["Lyon", "paris"]) == (1.0, 1.0)
    em, f1 = metrics.qa_scores("Final answer: New York City", "York")
    assert em == 0.0 and f1 == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def run_bad(capsys, argv):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(eval_cli.main(argv))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("eval.py: error: "), err
    return err


def test_bad_inputs(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", planning_rows(2))
    assert "no such file" in run_bad(
        capsys, ["--df_path", str(tmp_path / "nope.jsonl"), "--task", "planning", "--no_judge"]
    )
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(planning_rows(1)[0]) + "\n{not json\n")
    err = run_bad(capsys, ["--df_path", str(bad_json), "--task", "planning", "--no_judge"])
    assert f"{bad_json}:2: does not parse as JSON (Expecting property name" in err
    array = tmp_path / "array.jsonl"
    array.write_text("[1, 2]\n")
    assert f"{array}:1: expected a JSON object, got list" in run_bad(
        capsys, ["--df_path", str(array), "--task", "planning", "--no_judge"]
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no rows" in run_bad(capsys, ["--df_path", str(empty), "--task", "planning", "--no_judge"])
    # planning rows have no gold_keys/prompt
    assert f"{good}:1: missing column(s) prompt, gold_keys needed by --task retrieval" in run_bad(
        capsys, ["--df_path", str(good), "--task", "retrieval", "--no_judge"]
    )
    partial = write_jsonl(
        tmp_path / "partial.jsonl", [{k: v for k, v in r.items() if k != "parallel_time"} for r in planning_rows(1)]
    )
    assert "missing column(s) parallel_time" in run_bad(
        capsys, ["--df_path", str(partial), "--task", "planning", "--no_judge"]
    )
    dataset = write_jsonl(tmp_path / "dataset.jsonl", [{"task": "t", "answer": "a"}])
    assert "is this a results file?" in run_bad(capsys, ["--df_path", str(dataset), "--task", "planning", "--no_judge"])
    assert "invalid choice: 'translation'" in run_bad(capsys, ["--df_path", str(good), "--task", "translation"])
    assert "the judge needs an API key" in run_bad(capsys, ["--df_path", str(good), "--task", "planning"])
    assert "--concurrency must be >= 1" in run_bad(
        capsys, ["--df_path", str(good), "--task", "planning", "--no_judge", "--concurrency", "0"]
    )
    # nothing written beside the inputs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["good.jsonl", "bad.jsonl", "array.jsonl", "empty.jsonl", "partial.jsonl", "dataset.jsonl"]
    )


def test_step_ratio_beside_the_speedup(tmp_path, capsys):
    rows = reference_retrieval_rows()
    # tokens per pass: normal 200/200, 150/150, 80/80 -> mean 1.0; parallel 160/80, 250/100, 60/40 -> mean 2.0
    for row, (normal_steps, parallel_steps) in zip(rows, [(200, 80), (150, 100), (80, 40)]):
        row.update(normal_steps=normal_steps, parallel_steps=parallel_steps)
    path = write_jsonl(tmp_path / "steps.jsonl", rows)
    assert eval_cli.main(["--df_path", str(path), "--task", "retrieval", "--no_judge"]) == 0
    s = json.loads((tmp_path / "steps.summary.json").read_text())
    assert s["normal_steps"] == pytest.approx(430 / 3) and s["parallel_steps"] == pytest.approx(220 / 3)
    assert s["normal_tokens_per_step"] == pytest.approx(1.0) and s["parallel_tokens_per_step"] == pytest.approx(2.0)
    assert s["step_ratio"] == pytest.approx(2.0) and s["speedup"] == pytest.approx(2.0)
    out = capsys.readouterr().out
    assert "step ratio (mean parallel / mean normal tokens per forward pass" in out and "2.00x" in out
    assert metrics.row_step_ratio(rows[0]) == pytest.approx(2.0)
    # a file written before step counts existed: no step figures, the rest unchanged
    assert metrics.speed_summary(reference_retrieval_rows())["step_ratio"] is None


# ---------------------------------------------------------------------------------------------------------------------
# One writer per results file, one-mode runs, file modes


def test_judging_a_file_another_run_writes_is_refused(tmp_path, capsys):
    from parallel_decoding.runs.results import ResultsFile

    path = write_jsonl(tmp_path / "plan.jsonl", planning_rows(2))
    before = path.read_bytes()
    with JudgeServer(grade_by_mode) as server:
        with ResultsFile(path).locked():  # generate.py (or another eval.py) writing it
            assert eval_cli.main(judge_args(path, server)) == 2
        assert server.count == 0
    assert capsys.readouterr().err == (
        f"eval.py: error: {path} is being written by another run (pid {os.getpid()}); wait for it to finish\n"
    )
    assert path.read_bytes() == before
    assert eval_cli.main(["--df_path", str(path), "--task", "planning", "--no_judge"]) == 0  # reading needs no lock


def test_one_mode_run_prints_no_speedup_and_files_get_the_umask_mode(tmp_path, capsys):
    rows = [{k: v for k, v in r.items() if not k.startswith("parallel_")} for r in planning_rows(2)]
    path = write_jsonl(tmp_path / "normal_only.jsonl", rows)
    assert eval_cli.main(["--df_path", str(path), "--task", "planning", "--no_judge"]) == 0
    out = capsys.readouterr().out
    assert "speedup (mean parallel tokens/s / mean normal tokens/s): n/a (needs rows timed in both modes)" in out
    assert "mean per-row time ratio (normal_time / parallel_time): n/a (needs rows timed in both modes)" in out
    assert "-x" not in out
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("normal_only.summary.json", "normal_only.summary.md", "normal_only.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# ---------------------------------------------------------------------------------------------------------------------
# eval.py --report: every summary under a folder, side by side


def qa_rows():
    return [
        {
            "input": "Who directed X?",
            "context": "...",
            "answers": ["John Smith"],
            "_id": "a",
            "normal_response": "Final answer: John Smith.",
            "normal_time": 2.0,
            "normal_length": 30,
            "parallel_response": "Look up.\n####X: by John Smith.\n####%%%%\nFinal answer: John Smith",
            "parallel_time": 1.0,
            "parallel_length": 32,
            "num_parallel_branches": 1,
            "fallback": None,
            "error": None,
        },
        {
            "input": "Where was Y born?",
            "context": "...",
            "answers": ["Paris"],
            "_id": "b",
            "normal_response": "Final answer: Lyon",
            "normal_time": 1.0,
            "normal_length": 20,
            "parallel_response": "Final answer: Paris",
            "parallel_time": 1.0,
            "parallel_length": 20,
            "num_parallel_branches": 0,
            "fallback": "the model wrote no ####Title: block; decoded sequentially",
            "error": None,
        },
    ]


def read_csv(path):
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def evaluated_runs(root):
    """Two results files of two models and datasets, each evaluated with --no_judge; returns their summaries."""
    (root / "model-a").mkdir(parents=True)
    (root / "model-b").mkdir()
    retrieval = write_jsonl(root / "model-a" / "retrieval_4.jsonl", reference_retrieval_rows())
    qa = write_jsonl(root / "model-b" / "2wikimqa.jsonl", qa_rows())
    assert eval_cli.main(["--df_path", str(retrieval), "--task", "retrieval", "--no_judge"]) == 0
    assert eval_cli.main(["--df_path", str(qa), "--task", "multi-document-qa", "--no_judge"]) == 0
    return {
        ("model-a", "retrieval_4"): json.loads((root / "model-a" / "retrieval_4.summary.json").read_text()),
        ("model-b", "2wikimqa"): json.loads((root / "model-b" / "2wikimqa.summary.json").read_text()),
    }


def test_report_rows_equal_the_summaries(tmp_path, capsys):
    summaries = evaluated_runs(tmp_path)
    capsys.readouterr()
    assert eval_cli.main(["--report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    rows = read_csv(tmp_path / "report.csv")
    assert [(r["model"], r["dataset"]) for r in rows] == [("model-a", "retrieval_4"), ("model-b", "2wikimqa")]
    assert list(rows[0]) == list(report_mod.REPORT_COLUMNS)
    for row in rows:
        summary = summaries[row["model"], row["dataset"]]
        assert row["path"] == str(tmp_path / row["model"] / f"{row['dataset']}.summary.json")
        for column in report_mod.REPORT_COLUMNS:
            if column in ("model", "dataset", "path"):
                continue
            expected = summary.get(column)
            if expected is None:
                assert row[column] == "", column
            elif isinstance(expected, str):
                assert row[column] == expected
            else:
                assert float(row[column]) == expected, column  # full precision, no rounding
    a, b = rows
    assert float(a["speedup"]) == 2.0 and float(a["normal_accuracy"]) == pytest.approx(1 / 3)
    assert a["normal_f1"] == "" and b["normal_f1"] != "" and a["normal_score"] == "" and a["step_ratio"] == ""
    assert float(b["format_adherence"]) == 0.5 and b["fallback_rows"] == "1" and b["error_rows"] == "0"
    # printed and Markdown tables, and the chart
    assert captured.out.splitlines()[0].split()[:4] == ["model", "dataset", "task", "rows"]
    assert "2.00" in captured.out and "model-b" in captured.out
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "| model | dataset | task | rows |" in markdown and "| model-a | retrieval_4 | retrieval | 3 |" in markdown
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'report.csv'}" in captured.err
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".plot.*"))


def test_report_loads_old_style_summaries_and_newer_fields(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    old = {
        "task": "planning",
        "rows": 4,
        "speed_rows": 4,
        "error_rows": 0,
        "fallback_rows": 1,
        "normal_time": 2.0,
        "parallel_time": 1.0,
        "normal_length": 40.0,
        "parallel_length": 42.0,
        "normal_speed": 20.0,
        "parallel_speed": 42.0,
        "speedup": 2.1,
        "time_ratio": 2.0,
        "results": "x.jsonl",
    }
    (tmp_path / "m" / "old.summary.json").write_text(json.dumps({k: old[k] for k in ("task", "rows", "speedup")}))
    (tmp_path / "m" / "new.summary.json").write_text(
        json.dumps(dict(old, step_ratio=2.5, capped_rows=2, speedup="fast", a_field_from_the_future=[1, 2]))
    )
    (tmp_path / "prompt-b" / "m").mkdir(parents=True)  # a second --output_dir: its level stays in the model name
    (tmp_path / "prompt-b" / "m" / "new.summary.json").write_text(json.dumps(old))
    assert eval_cli.main(["--report", str(tmp_path)]) == 0
    new, old_row, other = read_csv(tmp_path / "report.csv")
    assert [(r["model"], r["dataset"]) for r in (new, old_row, other)] == [
        ("m", "new"),
        ("m", "old"),
        ("prompt-b/m", "new"),
    ]
    assert old_row["speedup"] == "2.1" and old_row["rows"] == "4" and old_row["task"] == "planning"
    assert all(old_row[c] == "" for c in ("normal_time", "parallel_speed", "step_ratio", "fallback_rows"))
    assert float(new["step_ratio"]) == 2.5 and new["capped_rows"] == "2"
    assert new["speedup"] == ""  # a field of an unexpected type is an empty cell
    assert "a_field_from_the_future" not in new
    assert "step ratio" in capsys.readouterr().out


def test_report_skips_a_broken_summary_and_names_it(tmp_path, capsys):
    evaluated_runs(tmp_path)
    broken = tmp_path / "model-b" / "planning.summary.json"
    broken.write_text('{"task": "planning", "rows": ')
    listed = tmp_path / "model-b" / "list.summary.json"
    listed.write_text("[1, 2]")
    capsys.readouterr()
    assert eval_cli.main(["--report", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"eval.py: warning: skipped {listed}: expected a JSON object, got list" in err
    assert f"eval.py: warning: skipped {broken}: not valid JSON (line 1: Expecting value)" in err
    assert [r["dataset"] for r in read_csv(tmp_path / "report.csv")] == ["retrieval_4", "2wikimqa"]


def test_report_bad_input_exits_2_with_one_line(tmp_path, capsys):
    def one_line_error():
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("eval.py: error: ")
        return err

    assert eval_cli.main(["--report", str(tmp_path)]) == 2
    assert f"--report {tmp_path}: no *.summary.json under it" in one_line_error()
    assert eval_cli.main(["--report", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in one_line_error()
    (tmp_path / "x.summary.json").write_bytes(b"\xff\xfe")
    assert eval_cli.main(["--report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"eval.py: warning: skipped {tmp_path / 'x.summary.json'}: not UTF-8 text")
    assert err[1] == f"eval.py: error: --report {tmp_path}: none of its 1 summaries could be read"
    assert not (tmp_path / "report.csv").exists()
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--report", str(tmp_path), "--df_path", "x.jsonl"])
    assert exit_info.value.code == 2 and "it takes no --df_path or --task" in one_line_error()
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--task", "retrieval"])
    assert exit_info.value.code == 2 and "the following arguments are required: --df_path" in one_line_error()


def test_report_default_folder_is_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    evaluated_runs(tmp_path / "results")
    assert eval_cli.main(["--report"]) == 0
    assert len(read_csv(tmp_path / "results" / "report.csv")) == 2
