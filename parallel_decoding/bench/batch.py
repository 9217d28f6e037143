"""Throughput and latency of the batch engine at several batch sizes, both modes, over a task's rows, in one run.

    python -m parallel_decoding.bench.batch --data_path data/retrieval_10.jsonl --batch_sizes 1 4 8 16

For each batch size, each mode decodes every row on one ``Engine`` (continuous batching: up to N requests in
flight, each joining as another leaves). Per setting: total tokens/s (generated tokens / wall time of the pass
over all rows), p50 and p99 latency (a request's admission to its last token), forward passes, and the ratio to
batch 1; and whether every answer equals its batch-1 answer. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from ..engine.batch import Engine
from ..engine.decode import chat_prompt_ids
from ..engine.timing import synchronize
from ..tasks import build_prompt, load_dataset, resolve_format_prompt
from .branch_stage import BenchError, cpu_model, exit_status

MODES = ("normal", "parallel")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between the nearest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    rows = load_dataset(args.task, args.data_path)[: args.max_samples]
    format_prompt = resolve_format_prompt(None, args.model_path)  # the model's own instruction, as generate.py
    return model, tokenizer, [build_prompt(args.task, row, format_prompt.text) for row in rows]


def measure(engine: Engine, prompts: list[str], parallel: bool, max_new_tokens: int) -> dict:
    """One pass over every prompt on ``engine``; tokens/s over the wall time, latencies per request."""
    synchronize(engine.model.device)
    start = time.perf_counter()
    results = engine.generate(prompts, parallel=parallel, max_new_tokens=max_new_tokens)
    synchronize(engine.model.device)
    wall = time.perf_counter() - start
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise BenchError(f"{len(failed)} requests failed, first: {failed[0]}")
    latencies = [r["time"] for r in results]
    tokens = sum(r["length"] for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "passes": engine.scheduler.passes,
            "responses": [r["response"] for r in results]}


def run(args) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, tokenizer, prompts = load(args)
    longest = max(len(chat_prompt_ids(tokenizer, p)) for p in prompts)
    settings = []
    for size in args.batch_sizes:
        capacity = args.kv_capacity or size * (longest + args.max_new_tokens)
        engine = Engine(model, tokenizer, max_batch_size=size, kv_capacity=capacity, compile=args.compile)
        for mode in MODES:  # untimed: one batch of each mode (allocator, caches)
            engine.generate(prompts[:size], parallel=mode == "parallel", max_new_tokens=args.max_new_tokens)
        for mode in MODES:
            engine.scheduler.passes = 0
            settings.append({"batch_size": size, "mode": mode, "capacity": capacity,
                             **measure(engine, prompts, mode == "parallel", args.max_new_tokens)})
    first = {s["mode"]: s for s in settings if s["batch_size"] == args.batch_sizes[0]}
    first_responses = {mode: list(s["responses"]) for mode, s in first.items()}
    for s in settings:
        s["speedup_vs_first"] = s["tokens_per_s"] / first[s["mode"]]["tokens_per_s"]
        s["same_answers_as_first"] = sum(a == b for a, b in zip(s.pop("responses"), first_responses[s["mode"]]))
    by_size = {(s["batch_size"], s["mode"]): s for s in settings}
    return {"rows": len(prompts), "cpu": cpu_model(), "threads": torch.get_num_threads(), "device": str(model.device),
            "compile": args.compile, "max_new_tokens": args.max_new_tokens, "settings": settings,
            "parallel_over_normal": {size: by_size[size, "parallel"]["tokens_per_s"] / by_size[size, "normal"]["tokens_per_s"]
                                     for size in args.batch_sizes}}


def report(result: dict) -> str:
    lines = [f"{result['rows']} rows, {result['cpu']}, {result['threads']} threads, {result['device']}, "
             f"compile {result['compile']}, max_new_tokens {result['max_new_tokens']}",
             "batch  mode       tokens/s  vs first  p50 s   p99 s   passes  same answers"]
    for s in result["settings"]:
        lines.append(f"{s['batch_size']:5}  {s['mode']:9} {s['tokens_per_s']:9.1f} {s['speedup_vs_first']:8.2f}x "
                     f"{s['p50_s']:6.3f} {s['p99_s']:7.3f} {s['passes']:8}  {s['same_answers_as_first']}/{result['rows']}")
    lines.append("parallel/normal tokens/s: " + ", ".join(
        f"batch {size}: {ratio:.2f}x" for size, ratio in result["parallel_over_normal"].items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m parallel_decoding.bench.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="models/tiny-qwen2-retrieval")
    p.add_argument("--task", default="retrieval")
    p.add_argument("--data_path", default="data/retrieval_10.jsonl")
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--kv_capacity", type=int, default=None, help="default: batch size x (longest prompt + budget)")
    p.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_threads", type=int, default=None)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1:
        raise BenchError(f"--batch_sizes must be >= 1, got {args.batch_sizes}")
    return args


def main(argv=None) -> int:
    def command():
        result = run(parse_args(argv))
        print(report(result))
        print(json.dumps(result))

    return exit_status("bench.batch", command)


if __name__ == "__main__":
    sys.exit(main())
