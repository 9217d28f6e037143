"""The fast decoder's compiled step against the KV arena's capacity, flex vs dense attention, in one run.

    python -m parallel_decoding.bench.step --config qwen2.5-0.5b --layers 4 --dtype float32 --num_threads 2
    python -m parallel_decoding.bench.step --config qwen2.5-7b --device cuda --dtype bfloat16 \
        --capacities 1024 32768 --rows 1 8

A random-weight Qwen2 of a named shape (``configs.py``; ``--layers N`` keeps its first N layers), one random prefix
of ``--prefix_len`` tokens prefilled into one :class:`~parallel_decoding.decoding.arena.FastDecoder` per attention
and capacity, each compiled (one bucket per ``--rows`` value) before anything is timed. A sweep crops the arena back
to the prefix, makes one untimed pass (the first token, or one title token per branch) and then ``--steps`` timed
steps of R query rows (R = 1: a normal step; R > 1: a branch step, one row per branch), timed together and divided
by the step count. Every decoder sweeps once per repeat, in turn, so load from other processes falls on all of
them alike; the reported time is the median over ``--repeats``.

Per attention, capacity and rows: the median ms per step, the bytes a step reads and the achieved GB/s. The bytes
are the weights once (``weight_bytes``) plus the keys and values attention touches:

- ``flex``: the KV blocks up to the written length (whole flex blocks), once per KV head: grouped-query heads read
  the arena as it is;
- ``dense``: every slot of the arena (capacity + 1), once per *query* head: the dense mask spans the arena, and
  transformers' sdpa with a mask repeats each KV head over its query-head group first (``repeat_kv``).

The mask, activations and logits are not counted. Per attention and rows, the ratio of the step time at the
largest capacity to the time at the smallest: 1 means the cost follows the text, capacity_max / capacity_min that it
follows the arena. Nothing may recompile while timed (dynamo's ``fail_on_recompile`` stance), and on CUDA every
call of a compiled pass in a timed step must replay a recorded CUDA graph (:class:`StepCheck`). The table goes to
stdout; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from ..decoding.arena import FastDecoder
from ..decoding.flex import BLOCK as FLEX_BLOCK
from ..engine.timing import synchronize
from .branch_stage import (
    DTYPES,
    BenchError,
    _no_init_context,
    bench_device,
    device_name,
    exit_status,
    fill_random_weights,
    random_model,
    random_tokens,
    weight_bytes,
)
from .configs import MODEL_CONFIGS

ATTENTIONS = ("flex", "dense")


class StepCheckFailed(Exception):
    """A timed step recompiled, or on CUDA did not replay a recorded graph: reported as one line, exit status 1."""


# --- model and decoders -----------------------------------------------------------------------------------------


def build_model(config_name: str, layers: int | None, device: torch.device, dtype: torch.dtype, seed: int):
    """``random_model`` of the named shape, or with ``layers`` the same shape cut to its first ``layers`` layers
    (built at that depth: the full model is never allocated)."""
    if layers is None or layers == MODEL_CONFIGS[config_name]["num_hidden_layers"]:
        return random_model(config_name, device, dtype, "sdpa", seed)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{**MODEL_CONFIGS[config_name], "num_hidden_layers": layers})
    no_init = _no_init_context() or contextlib.nullcontext()
    with torch.device(device), no_init:
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()
    fill_random_weights(model, config.initializer_range, seed)
    return model.eval()


def fast_decoder(model, capacity: int, attention: str, buckets: tuple[int, ...]) -> FastDecoder:
    """A compiled fast decoder attending with ``attention``, every bucket compiled (and on CUDA recorded) now."""
    try:
        decoder = FastDecoder(model, capacity, buckets=buckets, compile=True, attention=attention)
    except (TypeError, ValueError) as e:  # a torch without FlexAttention, or a FastDecoder without attention=
        raise BenchError(f"--attention {attention}: {e}") from None
    decoder.warm_up()
    return decoder


# --- bytes a step reads -------------------------------------------------------------------------------------------


def kv_slots_read(attention: str, written: int, capacity: int) -> int:
    """Arena slots one layer's attention reads per head: the written blocks (flex), the written slots (the project's
    Triton kernel, ``"kernel"``: its loads past the last key are masked off) or the whole arena (dense)."""
    if attention == "kernel":
        return written
    if attention == "flex":
        return min(-(-written // FLEX_BLOCK) * FLEX_BLOCK, capacity + 1)
    return capacity + 1


def _heads(model) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the model's text config."""
    text = model.config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_attention_heads, kv_heads, head_dim


def kv_heads_read(model, attention: str) -> int:
    """Heads' worth of K/V one layer's attention reads: the KV heads (flex, the kernel), or one copy per query head
    (dense: ``repeat_kv``)."""
    query_heads, kv_heads, _ = _heads(model)
    return query_heads if attention == "dense" else kv_heads


def kv_bytes(model, slots: float, heads: int | None = None) -> float:
    """Bytes of keys and values of ``slots`` slots in every layer, for ``heads`` heads (default: the KV heads)."""
    _, kv_heads, head_dim = _heads(model)
    layers = model.config.get_text_config().num_hidden_layers
    return 2 * layers * (heads or kv_heads) * head_dim * slots * model.dtype.itemsize


def attention_bytes(model, attention: str, written: int, capacity: int) -> float:
    """Bytes of K/V the attention of one step reads, all layers (see the module docstring)."""
    return kv_bytes(model, kv_slots_read(attention, written, capacity), kv_heads_read(model, attention))


# --- checks on the timed steps ------------------------------------------------------------------------------------


def cudagraph_skips() -> int:
    """Inductor's count of compiled graphs it did not capture as CUDA graphs (torch/_inductor/cudagraph_utils.py)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class StepCheck:
    """Watches timed compiled steps: dynamo's ``fail_on_recompile`` stance turns a recompile into a
    :class:`StepCheckFailed`; on CUDA it counts the calls that reach inductor's CUDA-graph trees and the graph
    replays among them (``CUDAGraphTreeManager._run`` / ``execute_node``), and the recordings and eager warm-up
    runs, so that :meth:`failure` can tell a step that ran outside a recorded graph. (The manager hands out
    ``functools.partial(self.run, ...)``, bound before the check starts, so it is ``_run``, looked up at each call,
    that is watched.)"""

    _COUNTED = {"_run": "calls", "execute_node": "replays", "record_function": "recordings", "run_eager": "eager_runs"}

    def __init__(self, what: str, graphs: bool, steps: int):
        self.what, self.steps = what, steps  # steps: the fewest compiled calls the timed steps make
        self.graphs = graphs  # whether the compiled passes are captured as CUDA graphs
        self.counts = dict.fromkeys(self._COUNTED.values(), 0)
        self.counted = False  # whether the cudagraph-tree methods could be watched
        self._depth = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> StepCheck:
        self.skips_before = cudagraph_skips()
        if self.graphs:
            self._watch_trees()
        torch.compiler.set_stance("fail_on_recompile")
        return self

    def __exit__(self, kind, error, trace) -> bool:
        torch.compiler.set_stance("default")
        if self._saved:
            from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

            for name, method in self._saved.items():
                setattr(CUDAGraphTreeManager, name, method)
        self.skips_after = cudagraph_skips()
        if isinstance(error, RuntimeError) and "Detected recompile" in str(error):
            raise StepCheckFailed(f"{self.what}: a timed step recompiled ({str(error).splitlines()[0]})") from None
        return False

    def _watch_trees(self) -> None:
        try:
            from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
        except ImportError:
            return
        if not all(hasattr(CUDAGraphTreeManager, name) for name in self._COUNTED):
            return
        for name, key in self._COUNTED.items():
            self._saved[name] = original = getattr(CUDAGraphTreeManager, name)
            setattr(CUDAGraphTreeManager, name, self._counting(original, key))
        self.counted = True

    def _counting(self, original, key: str):
        def counted(manager, *args, **kwargs):
            top = key != "calls" or self._depth == 0  # _run() may re-enter itself (via run()) for the same call
            self._depth += key == "calls"
            try:
                if top:
                    self.counts[key] += 1
                return original(manager, *args, **kwargs)
            finally:
                self._depth -= key == "calls"

        return counted

    def failure(self) -> str | None:
        """Why the timed steps were not all graphed replays, or None."""
        if not self.graphs:
            return None
        c = self.counts
        if self.skips_after:
            return (
                f"{self.what}: inductor skipped CUDA graphs for {self.skips_after} compiled graph(s) (cudagraph_skips)"
            )
        if self.counted and (c["calls"] < self.steps or c["replays"] != c["calls"]):
            return (
                f"{self.what}: {c['calls']} compiled calls in {self.steps} timed steps, {c['replays']} graph replays, "
                f"{c['recordings']} recordings, {c['eager_runs']} eager runs: a timed step ran outside a recorded graph"
            )
        return None

    def summary(self) -> dict:
        out = {"cudagraph_skips_before": self.skips_before, "cudagraph_skips_after": self.skips_after}
        if self.counted:
            out.update(self.counts)
        return out

    def describe(self) -> str:
        """One line for a report."""
        line = (
            f"{self.what}: cudagraph_skips {self.skips_before} after warm-up, {self.skips_after} after the timed "
            f"steps; no recompile"
        )
        if not self.graphs:
            return line + " (no CUDA graphs here)"
        c = self.counts
        if not self.counted:
            return line + "; graph replays not countable on this torch"
        return line + (
            f"; {c['calls']} compiled calls, {c['replays']} graph replays, {c['recordings']} recordings, "
            f"{c['eager_runs']} eager runs"
        )


# --- timing -------------------------------------------------------------------------------------------------------


def sweep(decoder: FastDecoder, prefix_len: int, first_tokens: list[int], steps: int) -> float:
    """Seconds per step: crop to the prefix, one untimed pass of ``first_tokens`` (R rows, one branch each if R > 1),
    then ``steps`` timed greedy steps of R rows."""
    rows = len(first_tokens)
    branches = list(range(rows)) if rows > 1 else None
    decoder.crop(prefix_len)

    def step(tokens: list[int], position: int) -> list[int]:
        if branches is None:
            return decoder.forward(tokens, greedy=True).tolist()
        return decoder.forward(
            tokens, positions=[position] * rows, branch_ids=branches, keep="all", greedy=True
        ).tolist()

    tokens = step(first_tokens, prefix_len)
    synchronize(decoder.device)
    start = time.perf_counter()
    for i in range(steps):
        tokens = step(tokens, prefix_len + 1 + i)  # tolist(): the host reads the tokens back, as the engine does
    synchronize(decoder.device)
    return (time.perf_counter() - start) / steps


def written_lengths(prefix_len: int, rows: int, steps: int) -> list[int]:
    """Arena length each timed step attends over: the prefix, the untimed first pass and its own rows included."""
    return [prefix_len + rows * (i + 2) for i in range(steps)]


def measure(model, args, device: torch.device, check: StepCheck) -> list[dict]:
    """One row per (attention, capacity, rows): the median of ``--repeats`` sweeps, decoders taking turns."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prefix = random_tokens(vocab, args.prefix_len, generator)
    first = {rows: random_tokens(vocab, rows, generator) for rows in args.rows}
    buckets = tuple(sorted(set(args.rows)))
    decoders = {}
    for attention in args.attention:
        for capacity in args.capacities:
            decoder = fast_decoder(model, capacity, attention, buckets)
            decoder.forward(prefix)  # the prefill: an exact-size pass, outside the timings
            for rows in args.rows:
                sweep(decoder, args.prefix_len, first[rows], 1)  # every path once before the timings
            decoders[attention, capacity] = decoder
    times = {(a, c, r): [] for a, c in decoders for r in args.rows}
    with check:
        for _ in range(args.repeats):
            for (attention, capacity), decoder in decoders.items():
                for rows in args.rows:
                    times[attention, capacity, rows].append(sweep(decoder, args.prefix_len, first[rows], args.steps))
    weights = weight_bytes(model)
    results = []
    for (attention, capacity, rows), seconds in times.items():
        written = written_lengths(args.prefix_len, rows, args.steps)
        kv = statistics.mean(attention_bytes(model, attention, w, capacity) for w in written)
        median = statistics.median(seconds)
        results.append(
            {
                "attention": attention,
                "capacity": capacity,
                "rows": rows,
                "mean_written": statistics.mean(written),
                "kv_slots_read": statistics.mean(kv_slots_read(attention, w, capacity) for w in written),
                "kv_heads_read": kv_heads_read(model, attention),
                "ms_per_step": 1e3 * median,
                "repeat_ms": [round(1e3 * s, 3) for s in seconds],
                "kv_bytes": int(kv),
                "bytes_per_step": int(weights + kv),
                "gb_per_s": (weights + kv) / median / 1e9,
            }
        )
    return results


def capacity_ratios(results: list[dict]) -> list[dict]:
    """Per attention and rows: step time at the largest capacity over the time at the smallest."""
    out = []
    for attention in dict.fromkeys(r["attention"] for r in results):
        for rows in dict.fromkeys(r["rows"] for r in results):
            mine = [r for r in results if r["attention"] == attention and r["rows"] == rows]
            low, high = min(mine, key=lambda r: r["capacity"]), max(mine, key=lambda r: r["capacity"])
            out.append(
                {
                    "attention": attention,
                    "rows": rows,
                    "capacity_min": low["capacity"],
                    "capacity_max": high["capacity"],
                    "ratio": high["ms_per_step"] / low["ms_per_step"],
                }
            )
    return out


# --- report -------------------------------------------------------------------------------------------------------


def format_table(results: list[dict]) -> str:
    lines = [
        "| attention | capacity | rows | KV slots read | x heads | ms/step | MB read/step | GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['attention']} | {r['capacity']} | {r['rows']} | {r['kv_slots_read']:.0f} | {r['kv_heads_read']} | "
            f"{r['ms_per_step']:.3f} | {r['bytes_per_step'] / 1e6:.1f} | {r['gb_per_s']:.1f} |"
        )
    return "\n".join(lines)


def run(args) -> dict:
    device = bench_device(args.device)
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    model = build_model(args.config, args.layers, device, DTYPES[args.dtype], args.seed)
    check = StepCheck(
        "timed steps",
        device.type == "cuda",
        args.repeats * len(args.capacities) * len(args.attention) * len(args.rows) * args.steps,
    )
    results = measure(model, args, device, check)
    summary = {
        "config": args.config,
        "layers": model.config.num_hidden_layers,
        "dtype": args.dtype,
        "device": str(device),
        "device_name": device_name(device),
        "prefix_len": args.prefix_len,
        "steps": args.steps,
        "repeats": args.repeats,
        "capacities": args.capacities,
        "attention": args.attention,
        "rows": args.rows,
        "weight_bytes": weight_bytes(model),
        "results": results,
        "capacity_ratios": capacity_ratios(results),
        "graphs": check.summary(),
        "torch": torch.__version__,
    }
    summary["failure"] = check.failure()
    return summary


def print_report(s: dict) -> None:
    print(
        f"{s['config']} ({s['layers']} layers, random weights, {s['dtype']}, {s['device_name']}), prefix "
        f"{s['prefix_len']} tokens, {s['steps']} steps per sweep, median of {s['repeats']} sweeps; "
        f"{s['weight_bytes'] / 1e9:.3f} GB weights read per step"
    )
    print(format_table(s["results"]))
    for r in s["capacity_ratios"]:
        print(
            f"{r['attention']}, {r['rows']} row(s): step at capacity {r['capacity_max']} / at {r['capacity_min']} "
            f"= {r['ratio']:.3f}x"
        )
    print(json.dumps(s))
    if s["failure"]:  # after the report: what was measured stays on record
        raise StepCheckFailed(s["failure"])


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse's usage line left out)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="python -m parallel_decoding.bench.step", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(MODEL_CONFIGS), default="qwen2.5-0.5b")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--capacities", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--attention", nargs="+", choices=ATTENTIONS, default=list(ATTENTIONS))
    p.add_argument("--prefix_len", type=int, default=600)
    p.add_argument("--steps", type=int, default=32, help="timed steps per sweep")
    p.add_argument("--repeats", type=int, default=3, help="sweeps per decoder; the median is reported")
    p.add_argument(
        "--rows", type=int, nargs="+", default=[1], help="query rows per step: 1 = a normal step, R > 1 = R branches"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag in ("prefix_len", "steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    layers = MODEL_CONFIGS[args.config]["num_hidden_layers"]
    if args.layers is not None and not 1 <= args.layers <= layers:
        p.error(f"--layers must be between 1 and {layers} for {args.config}, got {args.layers}")
    if min(args.rows) < 1 or max(args.rows) > FLEX_BLOCK:
        p.error(f"--rows must be between 1 and {FLEX_BLOCK}, got {args.rows}")
    needed = args.prefix_len + max(args.rows) * (args.steps + 1)
    if min(args.capacities) < needed:
        p.error(
            f"--capacities must hold --prefix_len + rows x (steps + 1) = {needed} tokens, got {min(args.capacities)}"
        )
    args.capacities = sorted(set(args.capacities))
    args.attention = list(dict.fromkeys(args.attention))
    args.rows = list(dict.fromkeys(args.rows))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return exit_status("parallel_decoding.bench.step", lambda: print_report(run(args)))
    except StepCheckFailed as e:
        print(f"parallel_decoding.bench.step: FAILED: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
