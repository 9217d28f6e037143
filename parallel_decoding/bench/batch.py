"""Throughput and latency of the batch engine at several batch sizes, both modes, in one run.

    python -m parallel_decoding.bench.batch --data_path data/retrieval_10.jsonl --batch_sizes 1 4 8 16
    python -m parallel_decoding.bench.batch --config qwen2.5-7b --device cuda --dtype bfloat16 --compile on \\
        --requests 32 --prompt_len 512 --batch_sizes 1 4 8 16      # the GPU table (scripts/gpu_check.sh)

Workloads: a task's rows on a checkpoint (default: the embedded model on ``data/retrieval_10.jsonl``), or with
``--config`` random weights of a real shape and synthetic requests (``bench.synthetic``: the method's passes in
their real order and sizes, set by ``--branches`` and friends, since a random model writes no skeleton).

One engine serves every setting: its arena holds the largest batch, and each batch size is its limit on the
requests in flight (continuous batching: up to N at once, each joining as another leaves). Each mode decodes every
request at every batch size ``--repeats`` times, the settings interleaved (batch sizes in turn, the order of the
modes alternating), so a slow stretch of a shared machine falls on all of them; a setting's figures are those of its
median repeat. Per setting: total tokens/s (generated tokens / wall time of the pass over all requests), p50 and p99
latency (a request's admission to its last token), forward passes, the ratio to the first batch size, and how many
answers equal their answer at the first batch size in every repeat. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..engine.batch import Engine, request_outcome
from ..engine.decode import chat_prompt_ids
from ..engine.timing import synchronize
from ..tasks import DatasetError, build_prompt, load_dataset, resolve_format_prompt
from .branch_stage import (
    DTYPES,
    BenchError,
    bench_device,
    checkpoint_model,
    device_name,
    exit_status,
    random_model,
    random_tokens,
)
from .configs import MODEL_CONFIGS
from .synthetic import SyntheticAnswer, SyntheticShape

MODES = ("normal", "parallel")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between the nearest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- workloads -----------------------------------------------------------------------------------------------------


@dataclass
class TaskWorkload:
    """A task's rows as chat prompts, decoded with ``Engine.generate``."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    max_new_tokens: int

    @property
    def count(self) -> int:
        return len(self.prompts)

    def describe(self) -> str:
        return f"{self.count} rows, max_new_tokens {self.max_new_tokens}"

    def slots_per_request(self) -> int:
        return max(len(chat_prompt_ids(self.tokenizer, p)) for p in self.prompts) + self.max_new_tokens

    def answers(self, engine: Engine, parallel: bool, count: int | None = None) -> list[dict]:
        return engine.generate(self.prompts[:count], parallel=parallel, max_new_tokens=self.max_new_tokens)


@dataclass
class SyntheticWorkload:
    """Synthetic requests (``bench.synthetic``) of random prompts, submitted to the engine's scheduler."""

    model: PreTrainedModel
    prompts: list[list[int]]
    titles: list[list[int]]
    shape: SyntheticShape

    @property
    def count(self) -> int:
        return len(self.prompts)

    def describe(self) -> str:
        s = self.shape
        return (
            f"{self.count} synthetic requests of {len(self.prompts[0])} prompt tokens; parallel: {s.skeleton_tokens} "
            f"skeleton tokens, {s.branches} branches x (1 + {s.branch_tokens}) tokens, {s.conclusion_tokens} "
            f"conclusion tokens; normal: the same {s.answer_tokens} answer tokens in sequence"
        )

    def slots_per_request(self) -> int:
        return SyntheticAnswer(self.prompts[0], True, self.shape, self.titles[0]).slots_needed

    def answers(self, engine: Engine, parallel: bool, count: int | None = None) -> list[dict]:
        requests = [
            engine.scheduler.submit(SyntheticAnswer(prompt, parallel, self.shape, titles))
            for prompt, titles in list(zip(self.prompts, self.titles))[:count]
        ]
        while not engine.idle:
            engine.step()
        return [request_outcome(request) for request in requests]


def task_workload(args) -> TaskWorkload:
    from transformers import AutoTokenizer

    try:
        rows = load_dataset(args.task, args.data_path)[: args.max_samples]
    except DatasetError as e:
        raise BenchError(str(e)) from e
    model = checkpoint_model(args.model_path, bench_device(args.device), DTYPES[args.dtype], "sdpa")
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    format_prompt = resolve_format_prompt(None, args.model_path)  # the model's own instruction, as generate.py
    return TaskWorkload(
        model, tokenizer, [build_prompt(args.task, row, format_prompt.text) for row in rows], args.max_new_tokens
    )


def synthetic_workload(args) -> SyntheticWorkload:
    try:
        shape = SyntheticShape(args.skeleton_tokens, args.branches, args.branch_tokens, args.conclusion_tokens)
    except ValueError as e:
        raise BenchError(str(e)) from e
    if args.requests < 1 or args.prompt_len < 1:
        raise BenchError(f"--requests and --prompt_len must be >= 1, got {args.requests} and {args.prompt_len}")
    model = random_model(args.config, bench_device(args.device), DTYPES[args.dtype], "sdpa", args.seed).eval()
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    prompts = [random_tokens(vocab, args.prompt_len, generator) for _ in range(args.requests)]
    titles = [random_tokens(vocab, shape.branches, generator) for _ in range(args.requests)]
    return SyntheticWorkload(model, prompts, titles, shape)


# --- measuring -----------------------------------------------------------------------------------------------------


def measure(engine: Engine, workload, parallel: bool) -> dict:
    """One pass over every request on ``engine``; tokens/s over the wall time, latencies per request."""
    engine.scheduler.passes = 0
    synchronize(engine.model.device)
    start = time.perf_counter()
    results = workload.answers(engine, parallel)
    synchronize(engine.model.device)
    wall = time.perf_counter() - start
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise BenchError(f"{len(failed)} requests failed, first: {failed[0]}")
    latencies = [r["time"] for r in results]
    tokens = sum(r["length"] for r in results)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "passes": engine.scheduler.passes,
        "responses": [r["response"] for r in results],
    }


def settings_order(batch_sizes: list[int], repeat: int) -> list[tuple[int, str]]:
    """The settings of one repeat: every batch size in turn, the modes in alternating order."""
    modes = MODES if repeat % 2 == 0 else MODES[::-1]
    return [(size, mode) for size in batch_sizes for mode in modes]


def median_sample(samples: list[dict]) -> dict:
    """The repeat with the median tokens/s (the lower middle one of an even count), with every repeat's rate."""
    ordered = sorted(samples, key=lambda s: s["tokens_per_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["tokens_per_s_repeats"] = [s["tokens_per_s"] for s in samples]
    return chosen


def run(args) -> dict:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    workload = synthetic_workload(args) if args.config else task_workload(args)
    largest = max(args.batch_sizes)
    capacity = args.kv_capacity or largest * workload.slots_per_request()
    engine = Engine(
        workload.model,
        getattr(workload, "tokenizer", None),
        max_batch_size=largest,
        kv_capacity=capacity,
        compile=args.compile,
        buckets=tuple(args.buckets) if args.buckets else None,
    )
    for mode in MODES:  # untimed: one full batch of each mode (allocator, caches)
        workload.answers(engine, mode == "parallel", largest)
    samples: dict[tuple[int, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for size, mode in settings_order(args.batch_sizes, repeat):
            engine.max_batch_size = size
            sample = measure(engine, workload, mode == "parallel")
            samples.setdefault((size, mode), []).append(sample)
            print(
                f"repeat {repeat + 1}, batch {size}, {mode}: {sample['tokens_per_s']:.1f} tokens/s, p50 "
                f"{sample['p50_s']:.3f} s, p99 {sample['p99_s']:.3f} s",
                file=sys.stderr,
                flush=True,
            )  # a run cut short keeps these
    first = {mode: samples[args.batch_sizes[0], mode][0]["responses"] for mode in MODES}
    settings = []
    for (size, mode), runs in sorted(
        samples.items(), key=lambda item: (args.batch_sizes.index(item[0][0]), item[0][1])
    ):
        setting = {"batch_size": size, "mode": mode, "capacity": capacity, **median_sample(runs)}
        setting.pop("responses")
        setting["same_answers_as_first"] = sum(
            all(run["responses"][i] == first[mode][i] for run in runs) for i in range(workload.count)
        )
        settings.append(setting)
    by_size = {(s["batch_size"], s["mode"]): s for s in settings}
    for s in settings:
        s["speedup_vs_first"] = s["tokens_per_s"] / by_size[args.batch_sizes[0], s["mode"]]["tokens_per_s"]
    return {
        "workload": workload.describe(),
        "requests": workload.count,
        "device": device_name(engine.model.device),
        "model": args.config or args.model_path,
        "dtype": args.dtype,
        "compile": args.compile,
        "repeats": args.repeats,
        "settings": settings,
        "parallel_over_normal": {
            size: by_size[size, "parallel"]["tokens_per_s"] / by_size[size, "normal"]["tokens_per_s"]
            for size in args.batch_sizes
        },
    }


def report(result: dict) -> str:
    lines = [
        f"{result['model']} ({result['dtype']}, compile {result['compile']}) on {result['device']}: "
        f"{result['workload']}; median of {result['repeats']} interleaved repeats",
        "batch  mode       tokens/s  vs first  p50 s   p99 s   passes  same answers",
    ]
    for s in result["settings"]:
        lines.append(
            f"{s['batch_size']:5}  {s['mode']:9} {s['tokens_per_s']:9.1f} {s['speedup_vs_first']:8.2f}x "
            f"{s['p50_s']:6.3f} {s['p99_s']:7.3f} {s['passes']:8}  {s['same_answers_as_first']}/{result['requests']}"
        )
    lines.append(
        "parallel/normal tokens/s: "
        + ", ".join(f"batch {size}: {ratio:.2f}x" for size, ratio in result["parallel_over_normal"].items())
    )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m parallel_decoding.bench.batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model_path", default="models/tiny-qwen2-retrieval")
    p.add_argument("--task", default="retrieval")
    p.add_argument("--data_path", default="data/retrieval_10.jsonl")
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument(
        "--config",
        choices=sorted(MODEL_CONFIGS),
        default=None,
        help="random weights of this shape and synthetic requests instead of --model_path and a task",
    )
    p.add_argument("--requests", type=int, default=32, help="synthetic requests (with --config)")
    p.add_argument("--prompt_len", type=int, default=512, help="tokens of each synthetic prompt")
    p.add_argument("--skeleton_tokens", type=int, default=SyntheticShape.skeleton_tokens)
    p.add_argument("--branches", type=int, default=SyntheticShape.branches)
    p.add_argument("--branch_tokens", type=int, default=SyntheticShape.branch_tokens)
    p.add_argument("--conclusion_tokens", type=int, default=SyntheticShape.conclusion_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting; the median is reported")
    p.add_argument("--kv_capacity", type=int, default=None, help="default: largest batch x (longest prompt + budget)")
    p.add_argument("--compile", default="off", choices=["auto", "on", "off"])
    p.add_argument("--buckets", type=int, nargs="+", default=None, help="compiled pass widths (default: the engine's)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--num_threads", type=int, default=None)
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.repeats < 1:
        raise BenchError(f"--batch_sizes and --repeats must be >= 1, got {args.batch_sizes} and {args.repeats}")
    if args.buckets and min(args.buckets) < 1:
        raise BenchError(f"--buckets must be >= 1, got {args.buckets}")
    return args


def main(argv=None) -> int:
    def command():
        result = run(parse_args(argv))
        print(report(result))
        print(json.dumps(result))

    return exit_status("bench.batch", command)


if __name__ == "__main__":
    sys.exit(main())
