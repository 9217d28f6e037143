"""End-to-end speed of both modes with the compiled fast path on and off, over a task's rows, in one process.

    python -m parallel_decoding.bench.rows --data_path data/retrieval_10.jsonl

Every row is decoded four times, normal and parallel, each with ``compile`` off (the eager reference) and on, in
that order row after row, so load from other processes falls on all four alike; the fast path is compiled for every
bucket before the first row. Prints per setting the mean tokens/s (mean of per-row length / time, as eval.py), the
mean forward passes, and the ratios the issue asks about, all from this one run; the last line is one JSON object.
Also checks that compile on and off give the same answers (float32: they should be identical).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from ..decoding.arena import prepare_fast_decoder
from ..engine.decode import chat_prompt_ids, normal_decode, parallel_decode
from ..tasks import build_prompt, load_dataset, resolve_format_prompt
from .branch_stage import cpu_model

SETTINGS = [("normal", False), ("normal", True), ("parallel", False), ("parallel", True)]


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    rows = load_dataset(args.task, args.data_path)[: args.max_samples]
    # The model's own format instruction where it has one, as generate.py uses: the toy never saw the default's.
    format_prompt = resolve_format_prompt(None, args.model_path)
    prompts = [build_prompt(args.task, row, format_prompt.text) for row in rows]
    capacity = max(len(chat_prompt_ids(tokenizer, p)) for p in prompts) + args.max_new_tokens
    fast = prepare_fast_decoder(model, capacity, warm_up=True)  # the compiled answers all run on it
    decode = {"normal": normal_decode, "parallel": parallel_decode}
    for mode, compile in SETTINGS:  # one untimed answer each: allocator, caches
        decoder = fast if compile else None
        decode[mode](model, tokenizer, prompts[0], max_new_tokens=args.max_new_tokens, compile=compile, decoder=decoder)

    speeds = {s: [] for s in SETTINGS}
    steps = {s: [] for s in SETTINGS}
    lengths = {s: [] for s in SETTINGS}
    same = {"normal": 0, "parallel": 0}
    for prompt in prompts:
        answers = {}
        for mode, compile in SETTINGS:
            decoder = fast if compile else None
            out = decode[mode](
                model, tokenizer, prompt, max_new_tokens=args.max_new_tokens, compile=compile, decoder=decoder
            )
            speeds[mode, compile].append(out["length"] / out["time"])
            steps[mode, compile].append(out["steps"])
            lengths[mode, compile].append(out["length"])
            answers[mode, compile] = out["response"]
        for mode in same:
            same[mode] += answers[mode, False] == answers[mode, True]

    mean = statistics.mean
    result = {"rows": len(prompts), "capacity": capacity, "threads": torch.get_num_threads(), "cpu": cpu_model()}
    for mode, compile in SETTINGS:
        key = f"{mode}_{'on' if compile else 'off'}"
        result[f"{key}_tokens_per_s"] = mean(speeds[mode, compile])
        result[f"{key}_steps"] = mean(steps[mode, compile])
        result[f"{key}_tokens_per_step"] = mean(n / s for n, s in zip(lengths[mode, compile], steps[mode, compile]))
    for key in ("normal", "parallel"):
        result[f"{key}_compile_speedup"] = result[f"{key}_on_tokens_per_s"] / result[f"{key}_off_tokens_per_s"]
    for key in ("off", "on"):
        result[f"parallel_over_normal_compile_{key}"] = (
            result[f"parallel_{key}_tokens_per_s"] / result[f"normal_{key}_tokens_per_s"]
        )
    result["step_ratio"] = result["parallel_on_tokens_per_step"] / result["normal_on_tokens_per_step"]
    result["same_answers_normal"] = same["normal"]
    result["same_answers_parallel"] = same["parallel"]
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m parallel_decoding.bench.rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="models/tiny-qwen2-retrieval")
    p.add_argument("--task", default="retrieval")
    p.add_argument("--data_path", default="data/retrieval_10.jsonl")
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--num_threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    result = run(parse_args(argv))
    print(f"{result['rows']} rows, {result['cpu']}, {result['threads']} threads, KV arena {result['capacity']} slots")
    print("setting            tokens/s  forward passes  tokens/pass")
    for mode in ("normal", "parallel"):
        for key in ("off", "on"):
            k = f"{mode}_{key}"
            print(
                f"{mode:8} compile {key:3} {result[k + '_tokens_per_s']:9.1f} {result[k + '_steps']:15.1f} "
                f"{result[k + '_tokens_per_step']:12.3f}"
            )
    print(
        f"compile on/off, normal tokens/s: {result['normal_compile_speedup']:.2f}x; "
        f"parallel: {result['parallel_compile_speedup']:.2f}x"
    )
    print(
        f"parallel/normal tokens/s: {result['parallel_over_normal_compile_on']:.2f}x compile on, "
        f"{result['parallel_over_normal_compile_off']:.2f}x off; step ratio {result['step_ratio']:.2f}x"
    )
    print(
        f"same answers compile on vs off: normal {result['same_answers_normal']}/{result['rows']}, "
        f"parallel {result['same_answers_parallel']}/{result['rows']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
