"""Benchmark of the branch stage alone: N branches of L tokens decoded one after another vs. together.

    python -m parallel_decoding.bench --config qwen2.5-0.5b --prefix_len 256 --num_branches 8 --branch_len 16
    python -m parallel_decoding.bench --config qwen2.5-7b --device cuda --dtype bfloat16 --prefix_len 2048 \
        --attn_implementation eager sdpa flash_attention_2 --sweep

Both modes start from the same prefilled prefix (prefilled once, outside the timings) and decode the same N x L
tokens after the same random N titles, greedily, without stop tokens:

(a) sequential: for each branch, crop the cache back to the prefix, prefill its title, then one pass per
    token -- what normal decoding does, one branch after another. N * L forward passes.
(b) parallel: ``decode_branches_cached``, all branches in one sequence under the tree mask. L forward passes.

``--compile`` runs both modes on the fast decoder (static KV arena sized for the run, compiled step per bucket,
every bucket compiled before the timings), so fast sequential is compared with fast parallel.

Weights are random (a real shape from ``configs.py``) unless ``--model_path`` loads a checkpoint. The table goes to
stdout; the last line is one JSON object (``speedup``, ``efficiency``, tokens/s, ``peak_memory_mb``, settings...).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ..decoding.arena import prepare_fast_decoder
from ..decoding.attention import KernelUnavailable, kernel_interpreter_enabled, register_branch_kernel, set_attention
from ..decoding.eager import EagerDecoder
from ..engine.branches import decode_branches_cached
from ..engine.decode import GenerationConfig
from ..engine.scheduler import drive, slots_of
from ..engine.sequential import Sequence, decode_sequential
from ..engine.timing import synchronize
from .configs import MODEL_CONFIGS, qwen2_config

ATTN_CHOICES = ("eager", "sdpa", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEP_BRANCHES = (1, 2, 4, 8, 16, 32)
REPO = Path(__file__).resolve().parents[2]


class BenchError(Exception):
    """A bad flag or an unusable setting: reported as one line, exit status 2."""


# --- model --------------------------------------------------------------------------------------------------------


def transformers_attention(name: str, device: torch.device) -> str:
    """The transformers attention name for a ``--attn_implementation`` choice.

    flash_attention_2 means the project's branch-aware Triton kernel for BOTH modes (the sequential run uses it in
    plain causal mode), so the comparison isolates the decoding scheme, not two different kernels.
    """
    if name != "flash_attention_2":
        return name
    try:
        registered = register_branch_kernel()
    except KernelUnavailable as e:
        raise BenchError(str(e)) from None
    if device.type != "cuda":
        if not kernel_interpreter_enabled():
            raise BenchError(
                "--attn_implementation flash_attention_2 runs a Triton kernel: it needs --device cuda "
                "(or TRITON_INTERPRET=1 on CPU, for correctness only)"
            )
    return registered


def _no_init_context():
    """transformers' context that skips the (slow, for 0.5B+ on a CPU: ~20 s) default weight init, if it has one."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return None
    return no_init_weights()


@torch.no_grad()
def fill_random_weights(model, std: float, seed: int) -> None:
    """Finite random weights: N(0, std) matrices and embeddings, zero biases, unit norm scales.

    Cheaper than transformers' per-module init and independent of it; the values only have to be finite and of a
    sane scale, since the benchmark decodes greedily whatever comes out.
    """
    generator = torch.Generator(device=model.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:  # RMSNorm scale
            param.fill_(1.0)


def random_model(config_name: str, device: torch.device, dtype: torch.dtype, attn: str, seed: int):
    """A random-weight Qwen2 of a real shape, built directly in ``dtype`` on ``device``."""
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(config_name)
    no_init = _no_init_context()
    with torch.device(device):
        if no_init is None:
            model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
        else:
            with no_init:
                model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model.tie_weights()  # skipped with the init; a no-op when the config does not tie
    fill_random_weights(model, config.initializer_range, seed)
    return model.eval()


def checkpoint_model(path: str, device: torch.device, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise BenchError(f"--model_path {path}: not a directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def weight_bytes(model) -> int:
    """Bytes of weights one forward pass reads, gpt-fast style: every parameter once, except the input embedding.

    The embedding lookup reads only the rows of the step's tokens, so its table is left out -- unless it is tied to
    the LM head, whose matmul reads the whole matrix (a tied matrix is counted once). The KV cache is not counted.
    """
    params = {p.data_ptr(): p for p in model.parameters()}  # tied weights share storage: count once
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    if not tied:
        total -= embedding.numel() * embedding.element_size()
    return total


# --- the two ways of decoding N branches ----------------------------------------------------------------------------


def decode_branches_one_after_another(decoder, prefix_len: int, branch_prefixes: list[list[int]], max_new_tokens: int):
    """What normal decoding does: each branch after the cached prefix, its title prefilled, then the engine's own
    sequential loop, one pass per token, greedy and without stop tokens."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    outputs = []
    for branch_prefix in branch_prefixes:
        decoder.crop(prefix_len)
        seq = Sequence(list(branch_prefix), len(branch_prefix) + max_new_tokens)
        logits = decoder.forward(list(branch_prefix))
        drive(decode_sequential(slots_of(decoder), seq, logits, max_new_tokens, config, stop_ids=frozenset()), decoder)
        outputs.append(seq.answer)
    return outputs


def decode_branches_together(decoder, prefix_len: int, branch_prefixes: list[list[int]], max_new_tokens: int):
    """The engine: every branch in one sequence; without stop tokens each makes exactly ``max_new_tokens``."""
    results = drive(decode_branches_cached(slots_of(decoder), prefix_len, branch_prefixes, max_new_tokens), decoder)
    outputs = [r.tokens for r in results]
    assert all(len(o) == max_new_tokens for o in outputs), "a branch stopped early without stop tokens"
    return outputs


MODES = {"sequential": decode_branches_one_after_another, "parallel": decode_branches_together}


# --- measurement ----------------------------------------------------------------------------------------------------


def random_tokens(vocab_size: int, count: int, generator: torch.Generator) -> list[int]:
    return torch.randint(0, vocab_size, (count,), generator=generator).tolist()


def peak_memory_mb(device: torch.device) -> float | None:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS (Linux reports KiB), model included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if platform.system() == "Linux":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_once(fn, device: torch.device) -> tuple[float, list[list[int]]]:
    synchronize(device)
    start = time.perf_counter()
    tokens = fn()
    synchronize(device)
    return time.perf_counter() - start, tokens


@torch.inference_mode()
def measure(
    model,
    prefix_ids: list[int],
    titles: list[list[int]],
    branch_len: int,
    repeats: int,
    warmup: int,
    compile: bool = False,
) -> dict:
    """Median wall time of each mode over ``repeats`` runs, after ``warmup`` untimed runs of each.

    The repeats alternate a, b, a, b, ... so that load from other processes falls on both modes alike.
    """
    device = model.device
    prefix_len = len(prefix_ids)
    if compile:  # an arena for the parallel layout; the buckets both modes use are compiled before any timing
        capacity = prefix_len + sum(len(t) for t in titles) + len(titles) * branch_len
        decoder = prepare_fast_decoder(model, capacity)
        # query rows of every pass: the prefix, one token, a title, one token per branch, all titles
        rows = {prefix_len, 1, len(titles[0]), len(titles), sum(len(t) for t in titles)}
        decoder.warm_up(tuple(sorted({decoder.bucket(n) for n in rows} - {None})))
    else:
        decoder = EagerDecoder(model)
    prefix_logits = decoder.forward(prefix_ids)  # once, outside the timings; each mode crops back to it
    if not bool(torch.isfinite(prefix_logits).all()):
        raise BenchError("the model's logits after the prefix are not finite (bad random init or dtype overflow)")
    runs = {mode: (lambda fn=fn: fn(decoder, prefix_len, titles, branch_len)) for mode, fn in MODES.items()}

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, float | None] = {}
    tokens: dict[str, list[list[int]]] = {}
    for mode, run in runs.items():
        reset_peak_memory(device)
        for _ in range(warmup):
            tokens[mode] = run()
            decoder.crop(prefix_len)
        peaks[mode] = peak_memory_mb(device)
    for _ in range(repeats):
        for mode, run in runs.items():
            reset_peak_memory(device)
            seconds, tokens[mode] = time_once(run, device)
            decoder.crop(prefix_len)
            peak = peak_memory_mb(device)
            peaks[mode] = peak if peaks[mode] is None else max(peaks[mode], peak)
            times[mode].append(seconds)

    num_branches = len(titles)
    seq_s, par_s = statistics.median(times["sequential"]), statistics.median(times["parallel"])
    generated = num_branches * branch_len
    bytes_per_pass = weight_bytes(model)
    seq_ms_per_step = 1e3 * seq_s / generated  # N * L passes, one token each
    par_ms_per_step = 1e3 * par_s / branch_len  # L passes, N tokens each
    speedup = seq_s / par_s
    same = sum(a == b for x, y in zip(tokens["sequential"], tokens["parallel"]) for a, b in zip(x, y))
    peak_values = [p for p in peaks.values() if p is not None]
    return {
        "num_branches": num_branches,
        "sequential_s": seq_s,
        "parallel_s": par_s,
        "sequential_ms_per_step": seq_ms_per_step,
        "parallel_ms_per_step": par_ms_per_step,
        "sequential_tokens_per_s": generated / seq_s,
        "parallel_tokens_per_s": generated / par_s,
        "speedup": speedup,
        "efficiency": speedup / num_branches,
        "sequential_weight_gb_per_s": bytes_per_pass / (seq_ms_per_step * 1e-3) / 1e9,
        "parallel_weight_gb_per_s": bytes_per_pass / (par_ms_per_step * 1e-3) / 1e9,
        "peak_memory_mb": max(peak_values) if peak_values else None,
        "sequential_peak_memory_mb": peaks["sequential"],
        "parallel_peak_memory_mb": peaks["parallel"],
        "token_agreement": same / generated,  # greedy tokens equal in both modes (1.0 up to float rounding)
        "sequential_times_s": times["sequential"],
        "parallel_times_s": times["parallel"],
    }


# --- output ---------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    ("attn", "attn_implementation", "{}"),
    ("N", "num_branches", "{}"),
    ("seq ms/step", "sequential_ms_per_step", "{:.2f}"),
    ("par ms/step", "parallel_ms_per_step", "{:.2f}"),
    ("seq tok/s", "sequential_tokens_per_s", "{:.1f}"),
    ("par tok/s", "parallel_tokens_per_s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("eff", "efficiency", "{:.2f}"),
    ("seq GB/s", "sequential_weight_gb_per_s", "{:.1f}"),
    ("par GB/s", "parallel_weight_gb_per_s", "{:.1f}"),
    ("peak MB", "peak_memory_mb", "{:.0f}"),
    ("agree", "token_agreement", "{:.2f}"),
)


def format_table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in TABLE_COLUMNS]]
    for row in rows:
        cells.append(["-" if row[k] is None else f.format(row[k]) for _, k, f in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


CSV_FIELDS = [k for _, k, _ in TABLE_COLUMNS] + ["branch_len", "prefix_len", "sequential_s", "parallel_s"]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_speedup(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4.5))
    branches = sorted({r["num_branches"] for r in rows})
    ax.plot(branches, branches, "k:", label="ideal (speedup = N)")
    for attn in dict.fromkeys(r["attn_implementation"] for r in rows):
        mine = sorted((r for r in rows if r["attn_implementation"] == attn), key=lambda r: r["num_branches"])
        ax.plot([r["num_branches"] for r in mine], [r["speedup"] for r in mine], "o-", label=attn)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(branches, [str(n) for n in branches])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("branches N")
    ax.set_ylabel("speedup (sequential time / one-sequence time)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m parallel_decoding.bench", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config",
        choices=sorted(MODEL_CONFIGS),
        default="qwen2.5-0.5b",
        help="random-weight model of this shape (default qwen2.5-0.5b)",
    )
    src.add_argument("--model_path", help="load this checkpoint directory instead of random weights")
    p.add_argument("--prefix_len", type=int, default=256, help="shared prefix length P")
    p.add_argument("--num_branches", type=int, default=8, help="branches N")
    p.add_argument("--branch_len", type=int, default=16, help="tokens generated per branch L")
    p.add_argument("--title_len", type=int, default=4, help="forced tokens (the title) before each branch")
    p.add_argument(
        "--attn_implementation",
        nargs="+",
        choices=ATTN_CHOICES,
        default=["sdpa"],
        help="one or more; flash_attention_2 = the project's Triton kernel (CUDA)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bfloat16",
        help="default bfloat16, the released checkpoints' dtype (on a CPU without AVX512-BF16/AMX float32 is faster)",
    )
    p.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); on a busy machine 1 can beat 2",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per mode first")
    p.add_argument("--sweep", action="store_true", help=f"N in {SWEEP_BRANCHES}: CSV + PNG of speedup vs N")
    p.add_argument("--out_dir", default="results/bench", help="where --sweep writes (default results/bench/)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="both modes on the fast decoder: static KV arena + compiled step (CUDA graphs on GPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.num_threads is not None and args.num_threads < 1:
        p.error(f"--num_threads must be >= 1, got {args.num_threads}")
    for flag in ("prefix_len", "num_branches", "branch_len", "title_len", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    args.attn_implementation = list(dict.fromkeys(args.attn_implementation))
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0]} ({len(names)} cores)" if names else f"{platform.machine()} CPU"


def bench_device(name: str) -> torch.device:
    """``--device`` as a device this machine has, or a :class:`BenchError`."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BenchError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: CUDA is not available")
    return device


def run(args: argparse.Namespace) -> dict:
    device = bench_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    attns = {name: transformers_attention(name, device) for name in args.attn_implementation}
    first_attn = attns[args.attn_implementation[0]]

    if args.model_path:
        model = checkpoint_model(args.model_path, device, dtype, first_attn)
    else:
        model = random_model(args.config, device, dtype, first_attn, args.seed)
    config = model.config.get_text_config()
    needed = args.prefix_len + args.title_len + args.branch_len
    if needed > config.max_position_embeddings:
        raise BenchError(
            f"--prefix_len + --title_len + --branch_len = {needed} exceeds the model's context "
            f"({config.max_position_embeddings})"
        )

    generator = torch.Generator().manual_seed(args.seed)
    branch_counts = SWEEP_BRANCHES if args.sweep else (args.num_branches,)
    prefix_ids = random_tokens(config.vocab_size, args.prefix_len, generator)
    all_titles = [random_tokens(config.vocab_size, args.title_len, generator) for _ in range(max(branch_counts))]

    settings = {
        "model": args.model_path or args.config,
        "prefix_len": args.prefix_len,
        "branch_len": args.branch_len,
        "title_len": args.title_len,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "device_name": device_name(device),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "seed": args.seed,
        "compile": args.compile,
        "weight_bytes_per_pass": weight_bytes(model),
        "torch": torch.__version__,
    }
    csv_path = png_path = None
    if args.sweep:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model_name = Path(str(settings["model"])).name
        stem = f"sweep_{model_name}_{settings['dtype']}_{device.type}_P{args.prefix_len}_L{args.branch_len}"
        csv_path, png_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.png"

    rows = []
    for name, attn in attns.items():
        set_attention(model, attn)
        for n in branch_counts:
            row = measure(model, prefix_ids, all_titles[:n], args.branch_len, args.repeats, args.warmup, args.compile)
            row = {"attn_implementation": name, **row, "branch_len": args.branch_len, "prefix_len": args.prefix_len}
            rows.append(row)
            print(f"# {name} N={n}: speedup {row['speedup']:.2f}x", file=sys.stderr, flush=True)
            if csv_path is not None:  # rewritten after every row: a run stopped by a time limit keeps what it measured
                write_csv(rows, csv_path)

    headline = next((r for r in rows if r["num_branches"] == args.num_branches), rows[-1])
    summary = {**{k: v for k, v in headline.items() if not k.endswith("_times_s")}, **settings, "results": rows}
    if args.sweep:
        summary["csv"], summary["png"] = str(csv_path), str(png_path)
        plot_speedup(
            rows,
            png_path,
            f"{settings['model']} {settings['dtype']} on {settings['device_name']}, "
            f"P={args.prefix_len}, L={args.branch_len}",
        )
    return {"rows": rows, "summary": summary}


def print_report(out: dict, sweep: bool) -> None:
    s = out["summary"]
    print(
        f"{s['model']} ({s['dtype']}, {s['device_name']}), P={s['prefix_len']}, L={s['branch_len']}, "
        f"title {s['title_len']} tokens, median of {s['repeats']}; "
        f"{s['weight_bytes_per_pass'] / 1e9:.3f} GB weights read per pass"
    )
    print(format_table(out["rows"]))
    if sweep:
        print(f"wrote {s['csv']} and {s['png']}")
    print(json.dumps(s))


def exit_status(prog: str, command) -> int:
    """Run ``command()``: 0, or a :class:`BenchError` as one line on stderr and status 2."""
    try:
        command()
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_status("parallel_decoding.bench", lambda: print_report(run(args), args.sweep))


if __name__ == "__main__":
    sys.exit(main())
