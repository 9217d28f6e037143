"""One GPU check of the fast path: step times against the bandwidth floor, flex vs dense vs the Triton kernel, CUDA
graphs, and fast-vs-eager token agreement.

    python -m parallel_decoding.bench.gpu_check --config qwen2.5-7b --device cuda --dtype bfloat16 \
        --out results/gpu_check.md
    python -m parallel_decoding.bench.gpu_check --config tiny --device cpu --dtype float32 --compile off \
        --capacity 128 --text_lens 16 40   # the CPU test

Random weights of a real shape (``configs.py``), one random prompt of ``--prompt_len`` tokens, a KV arena of
``--capacity`` slots (default: the model's context, what the engine allocates). Measured, each step time the median
of 3 timed runs after one untimed run:

1. ms/token of a normal (one-token) step, eager reference (``DynamicCache``) and fast (the arena's compiled step
   attending with ``--attention``, CUDA graphs on GPU); ms per fast parallel step for N in ``--branches`` (N query
   rows, one per branch, after N titles). For each, the bytes the step reads, the weights once (gpt-fast style) plus
   the K/V its attention touches (``step.attention_bytes``: the written blocks once per KV head for flex, the whole
   arena once per query head for the dense mask), over its time, and that time over the bandwidth floor (bytes /
   peak) where the device's peak is known;
2. at each of ``--text_lens`` tokens of text in an arena of the same capacity: the fast normal step with flex
   attention and with the dense mask, and one step's attention alone, every layer, replayed from a CUDA graph on
   GPU (``triton.testing.do_bench_cudagraph``): flex_attention with the step's own block mask, sdpa with the step's
   dense mask after ``repeat_kv``, and the project's Triton kernel over the written keys, each with its largest
   difference from the dense result;
3. CUDA graphs: inductor's ``cudagraph_skips`` counter after warm-up and after the timed steps, and how many compiled
   calls of the timed steps replayed a recorded graph (``step.StepCheck``). A recompile, a skipped graph or a timed
   step outside a recorded graph fails the check: the report is written, then one line and exit status 1;
4. token match rate: greedy tokens of the fast path vs the eager reference from the same prompt (bf16 on a GPU is
   not bitwise identical: the rate and the first divergence are reported, not asserted).

They run in the order normal steps, item 2, parallel steps, token match (the parallel steps' buckets are compiled
after item 2). The markdown report is rewritten after every measurement, so a run cut short by a time limit keeps
what it measured.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..decoding import flex
from ..decoding.arena import BUCKETS, FastDecoder, KVArena
from ..decoding.attention import KernelUnavailable, kernel_interpreter_enabled, register_branch_kernel
from ..decoding.eager import EagerDecoder
from ..decoding.interface import SHARED
from ..engine.timing import synchronize
from .branch_stage import DTYPES, BenchError, device_name, exit_status, random_model, random_tokens, weight_bytes
from .configs import MODEL_CONFIGS
from .step import (
    StepCheck,
    StepCheckFailed,
    attention_bytes,
    kv_bytes,
    kv_heads_read,
    kv_slots_read,
    written_lengths,
)

# Peak memory bandwidth (GB/s) of the devices this check is meant for; the floor is bytes / peak.
PEAK_GB_PER_S = {
    "H200": 4800.0,
    "H100 SXM": 3350.0,
    "H100 80GB HBM3": 3350.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100": 1555.0,
}


def peak_bandwidth(name: str) -> float | None:
    return next((gb for key, gb in PEAK_GB_PER_S.items() if key in name), None)


# --- the report ---------------------------------------------------------------------------------------------------


class Report:
    """The markdown report, rewritten to ``path`` after every measurement."""

    def __init__(self, path: str, settings: dict, peak: float | None):
        self.path, self.settings, self.peak = Path(path), settings, peak
        self.steps: list[str] = []  # rows of the step table
        self.compare: list[str] = []  # rows of the flex / dense table
        self.alone: list[str] = []  # rows of the attention-alone table
        self.graphs: list[str] = []  # one line per checked measurement
        self.failures: list[str] = []

    def rate(self, nbytes: float, seconds: float) -> str:
        """``MB read | GB/s | x bandwidth floor`` cells."""
        gbps = nbytes / seconds / 1e9
        floor = f"{self.peak / gbps:.2f}x" if self.peak else "peak unknown"
        return f"{nbytes / 1e6:.1f} | {gbps:.1f} | {floor}"

    def step(self, name: str, value: str, nbytes: float | None = None, seconds: float | None = None) -> None:
        cells = self.rate(nbytes, seconds) if seconds else " | | "
        self.steps.append(f"| {name} | {value} | {cells} |")
        self.write()

    def render(self) -> str:
        lines = ["# GPU check of the fast path", ""] + [f"- {k}: {v}" for k, v in self.settings.items()]
        lines += [
            "",
            "| measurement | value | MB read per step | achieved GB/s | x bandwidth floor |",
            "|---|---|---|---|---|",
            *self.steps,
        ]
        if self.compare:
            lines += [
                "",
                "## Flex vs dense step, by length of text in the arena",
                "",
                "| text tokens | attention | ms/step | MB read per step | achieved GB/s | x bandwidth floor |",
                "|---|---|---|---|---|---|",
                *self.compare,
            ]
        if self.alone:
            lines += [
                "",
                "## One step's attention alone, every layer (flex, dense mask, the Triton kernel)",
                "",
                "| text tokens | attention | ms (all layers) | K/V MB read | achieved GB/s | x bandwidth floor "
                "| max abs diff vs dense |",
                "|---|---|---|---|---|---|---|",
                *self.alone,
            ]
        if self.graphs:
            lines += ["", "## CUDA graphs and recompiles of the timed steps", "", *(f"- {g}" for g in self.graphs)]
            lines.append(f"- result: {'FAILED: ' + self.failures[0] if self.failures else 'passed'}")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.path.write_text(self.render(), encoding="utf-8")


def checked(report: Report, what: str, graphs: bool, steps: int, measure):
    """``measure()`` under a :class:`StepCheck`; its result, or None when it recompiled. Failures go to the report."""
    check = StepCheck(what, graphs, steps)
    try:
        with check:
            result = measure()
    except StepCheckFailed as e:
        report.failures.append(str(e))
        report.graphs.append(f"{e} -- FAILED")
        return None
    failure = check.failure()
    if failure:
        report.failures.append(failure)
    report.graphs.append(check.describe() + (f" -- FAILED: {failure}" if failure else ""))
    return result


# --- timed decoding -----------------------------------------------------------------------------------------------


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


def fast_kv_bytes(model, decoder: FastDecoder, compiled: bool, written: list[int]) -> float:
    """Mean K/V bytes the decoder's steps read over the given arena lengths: its compiled attention's, or uncompiled
    (every pass at its exact size: a dense mask over the written slots, repeat_kv) the written slots per query head."""
    if not compiled:
        return statistics.mean(kv_bytes(model, w, kv_heads_read(model, "dense")) for w in written)
    return statistics.mean(attention_bytes(model, decoder.attention, w, decoder.capacity) for w in written)


_compiled_flex = {}


def flex_attention_fn(compiled: bool):
    """torch's flex_attention, compiled once per process when ``compiled`` (eager flex is the unfused reference)."""
    if not compiled:
        return flex.flex_attention
    if not _compiled_flex:
        _compiled_flex["fn"] = torch.compile(flex.flex_attention, fullgraph=True, dynamic=False)
    return _compiled_flex["fn"]


# --- attention alone ----------------------------------------------------------------------------------------------


def branch_kernel(device: torch.device):
    """(the project's ``flash_attn_varlen_func``, None), or (None, why it cannot run here)."""
    try:
        register_branch_kernel()  # makes flash_attn_branch importable: the installed package or the working tree's
    except KernelUnavailable as e:
        return None, str(e)
    if device.type != "cuda" and not kernel_interpreter_enabled():
        return None, "CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)"
    from flash_attn_branch import flash_attn_varlen_func

    return flash_attn_varlen_func, None


def attention_callables(arena: KVArena, model, text_len: int, compiled: bool) -> dict:
    """One normal step's attention over every layer of ``arena`` at ``text_len`` written slots, per kind; each call
    returns layer 0's output, (1, H_q, 1, D)."""
    query_heads, kv_heads = model.config.get_text_config().num_attention_heads, arena.layers[0].keys.shape[1]
    head_dim, device, dtype = arena.layers[0].keys.shape[-1], arena.layers[0].keys.device, arena.layers[0].keys.dtype
    generator = torch.Generator(device=device).manual_seed(text_len)
    q = torch.randn((1, query_heads, 1, head_dim), generator=generator, device=device, dtype=dtype)  # (1, H_q, 1, D)
    scale = 1.0 / math.sqrt(head_dim)
    slots = torch.tensor([text_len - 1], device=device)  # (1,): the query's own slot
    branch, first = torch.tensor([SHARED], device=device), torch.tensor([0], device=device)  # (1,), (1,)
    mask = arena.tree_mask(slots, branch, first, dtype)  # (1, 1, 1, C + 1)
    arena.tables.visit([(0, text_len)])  # the blocks that hold the text, as a pass lists them
    block_mask = flex.block_mask(arena.tables, slots, branch, first) if flex.supported() else None  # (1, 1, 1, C + 1)
    flex_attention = flex_attention_fn(compiled) if block_mask is not None else None
    group = query_heads // kv_heads

    def repeat_kv(x):  # (1, H_kv, S, D) -> (1, H_q, S, D), as transformers does before sdpa with a mask
        return (
            x[:, :, None].expand(1, kv_heads, group, x.shape[2], head_dim).reshape(1, query_heads, x.shape[2], head_dim)
        )

    def dense():
        outs = [
            F.scaled_dot_product_attention(
                q, repeat_kv(layer.keys), repeat_kv(layer.values), attn_mask=mask, scale=scale
            )
            for layer in arena.layers
        ]  # each (1, H_q, 1, D)
        return outs[0]

    def flex_step():
        outs = [
            flex_attention(q, layer.keys, layer.values, block_mask=block_mask, scale=scale, enable_gqa=True)
            for layer in arena.layers
        ]  # each (1, H_q, 1, D)
        return outs[0]

    fns = {
        "dense": dense,
        "flex": flex_step if block_mask is not None else "this torch's FlexAttention cannot build the block mask",
    }
    kernel, why = branch_kernel(device)
    if kernel is None:
        return {**fns, "kernel": why}
    q_packed = q[0].transpose(0, 1)  # (1, H_q, D): the kernel's packed layout, a view
    cu_q = torch.tensor([0, 1], dtype=torch.int32, device=device)  # (2,)
    cu_k = torch.tensor([0, text_len], dtype=torch.int32, device=device)  # (2,)

    def kernel_step():
        outs = [
            kernel(
                q_packed,
                layer.keys[0, :, :text_len].transpose(0, 1),
                layer.values[0, :, :text_len].transpose(0, 1),
                cu_q,
                cu_k,
                1,
                text_len,
                softmax_scale=scale,
                causal=True,
            )
            for layer in arena.layers
        ]  # each (1, H_q, D); keys (T, H_kv, D) views of the arena
        return outs[0].transpose(0, 1)[None]  # (1, H_q, 1, D)

    return {**fns, "kernel": kernel_step}


def time_attention(fn, device: torch.device) -> float:
    """Seconds per call: on CUDA replayed from a CUDA graph (``do_bench_cudagraph``, median), else the median of 3."""
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_alone(report: Report, arena: KVArena, model, text_len: int, compiled: bool) -> None:
    device = arena.layers[0].keys.device
    reference = None
    for kind, fn in attention_callables(arena, model, text_len, compiled).items():
        if isinstance(fn, str):
            report.alone.append(f"| {text_len} | {kind} | not run: {fn} | | | | |")
            continue
        try:
            out = fn().float()
            seconds = time_attention(fn, device)
        except Exception as e:  # noqa: BLE001 -- one kind failing must not hide the others
            report.alone.append(f"| {text_len} | {kind} | error: {str(e).splitlines()[0][:200]} | | | | |")
            continue
        reference = out if reference is None else reference
        nbytes = kv_bytes(model, kv_slots_read(kind, text_len, arena.capacity), kv_heads_read(model, kind))
        diff = (out - reference).abs().max().item()
        report.alone.append(
            f"| {text_len} | {kind} | {1e3 * seconds:.3f} | {report.rate(nbytes, seconds)} | {diff:.2e} |"
        )
        report.write()


# --- the sections -------------------------------------------------------------------------------------------------


def fast_normal_section(report: Report, model, prompt: list[int], args) -> tuple[FastDecoder, float | None]:
    """The fast decoder on an arena of ``--capacity`` slots (only its one-row bucket compiled so far), and its
    normal step's seconds (None if it failed its check)."""
    buckets = tuple(sorted({next(b for b in BUCKETS if b >= n) for n in (1, *args.branches)}))  # one compile each
    compiled = args.compile == "on"
    try:
        fast = FastDecoder(model, args.capacity, buckets=buckets, compile=compiled, attention=args.attention)
    except ValueError as e:  # a torch without FlexAttention
        raise BenchError(f"--attention {args.attention}: {e}") from None
    fast.warm_up(buckets=(1,))  # the other buckets before the parallel steps: flex vs dense comes first
    steps = args.steps
    seconds = checked(
        report, "fast normal step", fast.use_cuda_graphs, steps, lambda: normal_steps(fast, prompt, steps)
    )
    if seconds is not None:
        kv = fast_kv_bytes(model, fast, compiled, written_lengths(len(prompt), 1, steps))
        report.step("fast normal step (ms/token)", f"{1e3 * seconds:.2f}", weight_bytes(model) + kv, seconds)
    return fast, seconds


def parallel_section(
    report: Report, model, fast: FastDecoder, prompt: list[int], titles: list[list[int]], args, normal: float | None
) -> None:
    """ms per fast parallel step for each N of ``--branches``, after the remaining buckets are compiled."""
    rest = tuple(b for b in fast.buckets if b != 1)
    if rest:
        fast.warm_up(buckets=rest)
    P, steps = len(prompt), args.steps
    for n in args.branches:
        seconds = checked(
            report,
            f"fast parallel step, N={n}",
            fast.use_cuda_graphs,
            steps,
            lambda n=n: parallel_steps(fast, prompt, titles[:n], steps),
        )
        if seconds is None:
            continue
        written = [P + n * args.title_len + n * (i + 1) for i in range(steps)]
        kv = fast_kv_bytes(model, fast, args.compile == "on", written)
        versus = f" ({seconds / normal:.2f}x normal)" if normal else ""
        report.step(
            f"fast parallel step, N={n} (ms/step)", f"{1e3 * seconds:.2f}{versus}", weight_bytes(model) + kv, seconds
        )


def compare_section(report: Report, model, fast: FastDecoder, args) -> None:
    """Flex vs dense steps, and the attention alone, at each ``--text_lens`` length in arenas of ``--capacity``."""
    weights, vocab = weight_bytes(model), model.config.get_text_config().vocab_size
    decoders = {fast.attention: fast}
    other = "dense" if fast.attention == "flex" else "flex"
    try:
        decoders[other] = FastDecoder(model, args.capacity, buckets=(1,), compile=args.compile == "on", attention=other)
        decoders[other].warm_up()
    except ValueError as e:  # a torch without FlexAttention
        report.compare.append(f"| | {other} | not run: {e} | | | |")
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.inference_mode():
        arena = KVArena(model, args.capacity)  # the attention-alone inputs: random keys and values
        for layer in arena.layers:
            layer.keys.normal_()
            layer.values.normal_()
    for text_len in args.text_lens:
        text = random_tokens(vocab, text_len, generator)
        for attention in ("flex", "dense"):
            decoder = decoders.get(attention)
            if decoder is None:
                continue
            what = f"{attention} step, {text_len} tokens of text"
            seconds = checked(
                report,
                what,
                decoder.use_cuda_graphs,
                args.steps,
                lambda decoder=decoder, text=text: normal_steps(decoder, text, args.steps),
            )
            if seconds is not None:
                kv = fast_kv_bytes(model, decoder, args.compile == "on", written_lengths(text_len, 1, args.steps))
                label = attention if args.compile == "on" else f"{attention} (uncompiled: exact-size passes)"
                report.compare.append(
                    f"| {text_len} | {label} | {1e3 * seconds:.2f} | {report.rate(weights + kv, seconds)} |"
                )
                report.write()
        with torch.inference_mode():
            attention_alone(report, arena, model, text_len, args.compile == "on")


def run(args) -> Report:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: CUDA is not available")
    model = random_model(args.config, device, DTYPES[args.dtype], args.attn_implementation, args.seed)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompt = random_tokens(vocab, args.prompt_len, generator)
    titles = [random_tokens(vocab, args.title_len, generator) for _ in range(max(args.branches))]
    peak = peak_bandwidth(device_name(device))
    settings = {
        "model": f"{args.config}, random weights, {args.dtype}",
        "device": device_name(device),
        "peak bandwidth": f"{peak:.0f} GB/s" if peak else "unknown (no floor ratio)",
        "prompt": f"{args.prompt_len} random tokens; {args.steps} timed steps, median of 3 runs",
        "fast path": f"KV arena of {args.capacity} slots, attention {args.attention}, compile {args.compile}",
        "bytes read per step": "the weights once + the K/V attention touches: flex, the written 128-slot blocks once "
        "per KV head; dense, the whole arena (capacity + 1) once per query head (repeat_kv); "
        "the Triton kernel and the eager step (sdpa's GQA path), the written slots once per KV head",
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report(args.out, settings, peak)

    eager = EagerDecoder(model)
    seconds = normal_steps(eager, prompt, args.steps)
    kv = statistics.mean(kv_bytes(model, w) for w in written_lengths(args.prompt_len, 1, args.steps))
    report.step("eager normal step (ms/token)", f"{1e3 * seconds:.2f}", weight_bytes(model) + kv, seconds)
    fast, normal = fast_normal_section(report, model, prompt, args)
    compare_section(report, model, fast, args)
    parallel_section(report, model, fast, prompt, titles, args, normal)
    reference = greedy_tokens(eager, prompt, args.match_tokens)
    fast_tokens = greedy_tokens(fast, prompt, args.match_tokens)
    rate, first = match_rate(reference, fast_tokens)
    where = "none" if first is None else f"first at token {first}"
    report.step(f"greedy token match, fast vs eager ({args.match_tokens} tokens)", f"{rate:.3f} (divergence: {where})")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m parallel_decoding.bench.gpu_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", choices=sorted(MODEL_CONFIGS), default="qwen2.5-7b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--attn_implementation", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--compile", choices=["on", "off"], default="on", help="off: the arena path uncompiled (CPU tests)")
    p.add_argument("--attention", choices=["flex", "dense"], default="flex", help="how the fast step attends")
    p.add_argument("--capacity", type=int, default=None, help="KV arena slots (default: the model's context)")
    p.add_argument("--prompt_len", type=int, default=1024)
    p.add_argument("--title_len", type=int, default=4)
    p.add_argument("--steps", type=int, default=32, help="timed steps per measurement")
    p.add_argument("--branches", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--text_lens", type=int, nargs="+", default=[1024, 8192], help="flex vs dense vs kernel at these")
    p.add_argument("--match_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/gpu_check.md")
    args = p.parse_args(argv)
    for flag in ("prompt_len", "title_len", "steps", "match_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 1 <= min(args.branches) <= max(args.branches) <= max(BUCKETS):
        p.error(f"--branches must be between 1 and {max(BUCKETS)}, got {args.branches}")
    if args.capacity is None:
        args.capacity = MODEL_CONFIGS[args.config]["max_position_embeddings"]
    needed = max(
        args.prompt_len + max(args.steps, args.match_tokens) + 1,
        args.prompt_len + max(args.branches) * (args.title_len + args.steps),
        max(args.text_lens) + args.steps + 1,
    )
    if min(args.text_lens) < 1 or args.capacity < needed:
        p.error(f"--capacity {args.capacity} must hold the longest measurement ({needed} tokens), --text_lens >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    reports = []
    status = exit_status("parallel_decoding.bench.gpu_check", lambda: reports.append(run(args)))
    if status or not reports:
        return status
    print(reports[0].render(), end="")
    if reports[0].failures:
        print(f"parallel_decoding.bench.gpu_check: FAILED: {reports[0].failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
