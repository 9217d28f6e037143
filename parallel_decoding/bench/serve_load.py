"""``python -m parallel_decoding.bench.serve_load``: load on the HTTP server (``python -m parallel_decoding.serve``).

Requests per second, p50 / p99 latency and answer tokens per second at each concurrency (default 1, 4, 16), in
both modes, against a server it starts on 127.0.0.1 (an ephemeral port; stopped at the end) or one at
``--base_url``. The requests are retrieval rows (``data/retrieval_4.jsonl``) with the model's own format prompt
when its directory has one (the embedded model does), greedy, one untimed warm-up request per mode first. It also
reports the wall time of the requests sent all at once over the same requests sent one after another
(``ratio_<c>_vs_sequential``), and whether the answers were the same. A table, then one JSON line.

    python -m parallel_decoding.bench.serve_load                      # the embedded model, compile off on a CPU
    python -m parallel_decoding.bench.serve_load --base_url http://127.0.0.1:8000/v1 --requests 64
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..serve.launch import ServerDidNotStart, start_server

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = REPO / "models" / "tiny-qwen2-retrieval"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m parallel_decoding.bench.serve_load", description=__doc__.splitlines()[0]
    )
    p.add_argument("--base_url", default=None, help="a running server's /v1 URL (default: start one on 127.0.0.1)")
    p.add_argument("--api_key", default="unused")
    p.add_argument("--model_path", default=str(EMBEDDED), help="the model to serve (and whose format prompt to send)")
    p.add_argument("--data_path", default=str(REPO / "data" / "retrieval_4.jsonl"))
    p.add_argument("--requests", type=int, default=16, help="requests per (mode, concurrency)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--modes", default="normal,parallel")
    p.add_argument("--max_tokens", type=int, default=160)
    p.add_argument(
        "--server_flags",
        default="--compile off --max_batch_size 16",
        help="flags of the server it starts (beside --model_path and --port 0)",
    )
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    if args.requests < 1 or min(args.concurrency) < 1 or not set(args.modes) <= {"normal", "parallel"}:
        p.error("--requests and every --concurrency must be >= 1; --modes takes normal and parallel")
    return args


def prompts(model_path: str, data_path: str, count: int) -> list[str]:
    from parallel_decoding.tasks import build_prompt, load_dataset, read_format_prompt

    own = Path(model_path) / "format_prompt.txt"
    instruction = read_format_prompt(own) if own.is_file() else None
    rows = load_dataset("retrieval", data_path)
    return [build_prompt("retrieval", rows[i % len(rows)], instruction) for i in range(count)]


def start_load_server(model_path: str, flags: str):
    """The server to load: a subprocess on 127.0.0.1 (``serve.launch``); returns (process, its /v1 URL)."""
    try:
        return start_server(["--model_path", model_path, *flags.split()], timeout=900)
    except ServerDidNotStart as e:
        raise SystemExit(str(e)) from None


def stop_server(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(60)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_level(client, model: str, texts: list[str], parallel: bool, concurrency: int, max_tokens: int) -> dict:
    """Every prompt once, ``concurrency`` requests at a time; wall time, latencies, answers."""

    def one(text):
        start = time.perf_counter()
        out = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens,
            extra_body={"parallel": parallel},
        )
        return time.perf_counter() - start, out.choices[0].message.content, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, texts))
    wall = time.perf_counter() - start
    latencies = [d[0] for d in done]
    return {
        "mode": "parallel" if parallel else "normal",
        "concurrency": concurrency,
        "requests": len(texts),
        "wall_s": wall,
        "requests_per_s": len(texts) / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "tokens_per_s": sum(d[2] for d in done) / wall,
        "answers": [d[1] for d in done],
    }


def table(levels: list[dict]) -> str:
    lines = [f"{'mode':<9} {'conc':>4} {'req/s':>8} {'p50 s':>8} {'p99 s':>8} {'tok/s':>9} {'wall s':>8}"]
    for r in levels:
        lines.append(
            f"{r['mode']:<9} {r['concurrency']:>4} {r['requests_per_s']:>8.2f} {r['p50_s']:>8.3f} "
            f"{r['p99_s']:>8.3f} {r['tokens_per_s']:>9.1f} {r['wall_s']:>8.2f}"
        )
    return "\n".join(lines)


def ratios(levels: list[dict]) -> dict:
    """Per mode: wall time at the highest concurrency over concurrency 1, and whether the answers were identical."""
    out = {}
    for mode in {r["mode"] for r in levels}:
        runs = {r["concurrency"]: r for r in levels if r["mode"] == mode}
        if 1 in runs and max(runs) > 1:
            top = runs[max(runs)]
            out[mode] = {
                "concurrency": top["concurrency"],
                "ratio": top["wall_s"] / runs[1]["wall_s"],
                "answers_identical": top["answers"] == runs[1]["answers"],
            }
    return out


def main(argv=None) -> int:
    import openai

    args = parse_args(argv)
    proc, url = (None, args.base_url) if args.base_url else start_load_server(args.model_path, args.server_flags)
    try:
        client = openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
        model = client.models.list().data[0].id
        texts = prompts(args.model_path, args.data_path, args.requests)
        levels = []
        for mode in args.modes:
            run_level(client, model, texts[:1], mode == "parallel", 1, args.max_tokens)  # warm-up, untimed
            for concurrency in args.concurrency:
                levels.append(run_level(client, model, texts, mode == "parallel", concurrency, args.max_tokens))
    finally:
        code = None if proc is None else stop_server(proc)
    print(f"model {model} at {url}; {args.requests} requests per row, max_tokens {args.max_tokens}")
    print(table(levels))
    summary = ratios(levels)
    for mode, r in sorted(summary.items()):
        print(
            f"{mode}: {r['concurrency']} concurrent / sequential wall time = {r['ratio']:.2f}x, "
            f"answers identical: {r['answers_identical']}"
        )
    record = {
        "model": model,
        "max_tokens": args.max_tokens,
        "server_exit": code,
        "levels": [{k: v for k, v in r.items() if k != "answers"} for r in levels],
        **{f"ratio_vs_sequential_{mode}": r for mode, r in summary.items()},
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
