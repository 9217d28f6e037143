"""One GPU check of the fast path: step times against the bandwidth floor, and fast-vs-eager token agreement.

    python -m parallel_decoding.gpu_check --config qwen2.5-7b --device cuda --dtype bfloat16 --out results/gpu_check.md
    python -m parallel_decoding.gpu_check --config tiny --device cpu --dtype float32 --compile off   # the CPU test

Random weights of a real shape (``configs.py``), one random prompt of ``--prompt_len`` tokens. Measured, each as the
median of ``--repeats`` timed runs after one untimed run:

- ms/token of a normal (one-token) step, eager reference (``DynamicCache``) and fast (KV arena, compiled step,
  CUDA graphs on GPU);
- ms per fast parallel step for N in ``--branches``: N query rows, one per branch, after N titles;
- achieved GB/s: the bytes a step must read (weights, gpt-fast style, plus the keys and values it attends over)
  divided by its time, and the step time over the bandwidth floor where the device's peak is known;
- token match rate: greedy tokens of the fast path vs the eager reference from the same prompt (bf16 on a GPU is
  not bitwise identical: the rate and the first divergence are reported, not asserted).

The markdown report is rewritten after every section, so a run cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from ..decoding.arena import BUCKETS, FastDecoder
from .branch_stage import DTYPES, BenchError, device_name, exit_status, random_model, random_tokens, weight_bytes
from .configs import MODEL_CONFIGS
from ..decoding.eager import EagerDecoder
from ..engine.timing import synchronize

# Peak memory bandwidth (GB/s) of the devices this check is meant for; the floor is bytes / peak.
PEAK_GB_PER_S = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                 "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


def peak_bandwidth(name: str) -> float | None:
    return next((gb for key, gb in PEAK_GB_PER_S.items() if key in name), None)


def kv_bytes(model, keys: int) -> int:
    """Bytes of keys and values over ``keys`` slots in every layer."""
    text = model.config.get_text_config()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * keys * model.dtype.itemsize


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one untimed run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def greedy_tokens(decoder, prompt: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``prompt``, one pass each, reading each token back as the engine does."""
    decoder.reset()
    next_token = decoder.forward(prompt, greedy=True)  # (1,)
    tokens = []
    for _ in range(count):
        token = int(next_token)
        tokens.append(token)
        next_token = decoder.forward([token], greedy=True)
    return tokens


def normal_steps(decoder, prompt: list[int], steps: int) -> float:
    """Seconds per one-token step after ``prompt`` (the prefill is not timed)."""
    device = decoder.model.device

    def run():
        decoder.reset()
        decoder.forward(prompt)
        token = decoder.forward([prompt[-1]], greedy=True).tolist()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            token = decoder.forward(token, greedy=True).tolist()  # the argmax is taken in the step
        synchronize(device)
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(3)) / steps


def parallel_steps(decoder: FastDecoder, prompt: list[int], titles: list[list[int]], steps: int) -> float:
    """Seconds per step of ``len(titles)`` branch rows after the prompt and the titles' tree prefill."""
    device = decoder.model.device
    prefix_len, title_len = len(prompt), len(titles[0])
    branches = list(range(len(titles)))

    def run():
        decoder.reset()
        decoder.forward(prompt)
        decoder.forward(
            [t for title in titles for t in title],
            positions=[prefix_len + j for _ in titles for j in range(title_len)],
            branch_ids=[b for b in branches for _ in range(title_len)],
            keep=[(b + 1) * title_len - 1 for b in branches],
        )
        tokens = [title[-1] for title in titles]
        synchronize(device)
        start = time.perf_counter()
        for step in range(steps):
            positions = [prefix_len + title_len + step] * len(titles)
            tokens = decoder.forward(tokens, positions=positions, branch_ids=branches, keep="all", greedy=True).tolist()
        synchronize(device)
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(3)) / steps


def match_rate(a: list[int], b: list[int]) -> tuple[float, int | None]:
    same = sum(x == y for x, y in zip(a, b))
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return same / len(a), first


def report(rows: list[tuple], settings: dict) -> str:
    lines = ["# GPU check of the fast path", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    lines += ["", "| measurement | value | bytes read per step | achieved GB/s | x bandwidth floor |", "|---|---|---|---|---|"]
    for name, value, nbytes, seconds, peak in rows:
        if seconds is None:
            lines.append(f"| {name} | {value} | | | |")
            continue
        gbps = nbytes / seconds / 1e9
        floor = f"{gbps and peak / gbps:.2f}x" if peak else "peak unknown"
        lines.append(f"| {name} | {value} | {nbytes / 1e6:.1f} MB | {gbps:.1f} | {floor} |")
    return "\n".join(lines) + "\n"


def run(args) -> str:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available")
    dtype = DTYPES[args.dtype]
    model = random_model(args.config, device, dtype, args.attn_implementation, args.seed)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompt = random_tokens(vocab, args.prompt_len, generator)
    max_branches = max(args.branches)
    titles = [random_tokens(vocab, args.title_len, generator) for _ in range(max_branches)]
    capacity = args.prompt_len + max(args.steps, args.match_tokens) + max_branches * (args.title_len + args.steps) + 1
    peak = peak_bandwidth(device_name(device))
    settings = {
        "model": f"{args.config}, random weights, {args.dtype}",
        "device": device_name(device),
        "peak bandwidth": f"{peak:.0f} GB/s" if peak else "unknown (no floor ratio)",
        "prompt": f"{args.prompt_len} random tokens; {args.steps} timed steps, median of 3 runs",
        "fast path": f"KV arena of {capacity} slots, compile {'on' if args.compile == 'on' else 'off'}",
        "torch": torch.__version__,
    }
    weights = weight_bytes(model)
    rows: list[tuple] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        out.write_text(report(rows, settings), encoding="utf-8")

    eager = EagerDecoder(model)
    seconds = normal_steps(eager, prompt, args.steps)
    mean_keys = args.prompt_len + args.steps // 2
    rows.append(("eager normal step (ms/token)", f"{1e3 * seconds:.2f}", weights + kv_bytes(model, mean_keys), seconds, peak))
    write()

    # Buckets up to the largest N only (each is a compile of the whole model); tree prefills above run uncompiled.
    buckets = tuple(b for b in BUCKETS if b < max_branches) + (next(b for b in BUCKETS if b >= max_branches),)
    fast = FastDecoder(model, capacity, buckets=buckets, compile=args.compile == "on")
    fast.warm_up()
    arena = kv_bytes(model, capacity + 1)  # the fast step attends over the whole arena
    seconds = normal_steps(fast, prompt, args.steps)
    normal_fast = seconds
    rows.append(("fast normal step (ms/token)", f"{1e3 * seconds:.2f}", weights + arena, seconds, peak))
    write()
    for n in args.branches:
        seconds = parallel_steps(fast, prompt, titles[:n], args.steps)
        rows.append((f"fast parallel step, N={n} (ms/step)", f"{1e3 * seconds:.2f} ({seconds / normal_fast:.2f}x normal)",
                     weights + arena, seconds, peak))
        write()

    reference = greedy_tokens(eager, prompt, args.match_tokens)
    fast_tokens = greedy_tokens(fast, prompt, args.match_tokens)
    rate, first = match_rate(reference, fast_tokens)
    where = "none" if first is None else f"first at token {first}"
    rows.append((f"greedy token match, fast vs eager ({args.match_tokens} tokens)", f"{rate:.3f} (divergence: {where})",
                 0, None, None))
    write()
    return report(rows, settings)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m parallel_decoding.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(MODEL_CONFIGS), default="qwen2.5-7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--compile", choices=["on", "off"], default="on", help="off: the arena path uncompiled (CPU tests)")
    p.add_argument("--prompt_len", type=int, default=1024)
    p.add_argument("--title_len", type=int, default=4)
    p.add_argument("--steps", type=int, default=32, help="timed steps per measurement")
    p.add_argument("--branches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--match_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/gpu_check.md")
    args = p.parse_args(argv)
    for flag in ("prompt_len", "title_len", "steps", "match_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 1 <= min(args.branches) <= max(args.branches) <= max(BUCKETS):
        p.error(f"--branches must be between 1 and {max(BUCKETS)}, got {args.branches}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_status("parallel_decoding.gpu_check", lambda: print(run(args), end=""))


if __name__ == "__main__":
    sys.exit(main())
