"""Benchmark: branch-aware kernel vs. PyTorch SDPA with the equivalent boolean mask (CUDA only).

    python -m flash_attn_branch.bench --out results/flash_bench.md

For every shape it first checks the kernel's bf16 output against the float64 reference (tolerance tied to SDPA's
own error in bf16), then times the kernel and SDPA with triton.testing.do_bench (median).  Shapes: decode steps
with 8 or 16 branch queries over 2k / 8k / 32k keys laid out as the engine does (shared prefix, title block,
interleaved branch tokens), a tree-prefill step, and a plain causal prefill.  Heads default to a 7B-class model
(28 query heads, 4 KV heads, head dim 128).
"""

import argparse
import datetime
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .interface import _flash_attn_varlen_forward, gpu_info, pick_launch_config
from .layout import branch_ids_for_engine_layout
from .reference import branch_visibility_mask, flash_attn_varlen_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
TOLERANCE_FACTOR = 2.0  # the kernel may be this many times less accurate than SDPA in the same dtype


@dataclass(frozen=True)
class Shape:
    name: str
    q_len: int
    k_len: int
    num_branches: int  # 0: plain causal attention, no branch ids
    title_len: int = 8  # tokens of each branch's title in the tree-prefill block


def default_shapes(branch_tokens: int) -> list[Shape]:
    shapes = [Shape(f"decode b={b} k={k // 1024}k", b, k, b) for b in (8, 16) for k in (2048, 8192, 32768)]
    shapes.append(Shape("tree prefill b=16 k=8k", 16 * 16, 8192, 16, title_len=16))
    shapes.append(Shape("causal prefill 4k", 4096, 4096, 0))
    return shapes


def branch_layout(shape: Shape, branch_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """(q_branch, k_branch) of the engine's layout, or (None, None) for plain causal shapes.

    Decode: prefix, titles, then interleaved steps of all branches; the queries are the last step (one per branch).
    Tree prefill: prefix, then the title block, which is the query.
    """
    if shape.num_branches == 0:
        return None, None
    b = shape.num_branches
    if shape.q_len == b:  # decode step
        steps = max(1, branch_tokens - shape.title_len)
        prefix = shape.k_len - b * shape.title_len - b * steps
        if prefix < 0:
            raise ValueError(f"{shape.name}: {b} branches x {branch_tokens} tokens do not fit in {shape.k_len} keys")
        k_branch = branch_ids_for_engine_layout(prefix, [shape.title_len] * b, [list(range(b))] * steps, device)
        return k_branch[-b:].contiguous(), k_branch
    prefix = shape.k_len - shape.q_len  # tree prefill: the queries are the title block
    k_branch = branch_ids_for_engine_layout(prefix, [shape.q_len // b] * b, (), device)
    return k_branch[prefix:].contiguous(), k_branch


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * group, T, D), what transformers does before SDPA with a mask."""
    batch, num_kv_heads, length, head_dim = x.shape
    return x[:, :, None].expand(batch, num_kv_heads, group, length, head_dim).reshape(batch, -1, length, head_dim)


def bench_shape(shape: Shape, args, device, time_fn) -> dict:
    dtype = DTYPES[args.dtype]
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.q_len, args.num_heads, args.head_dim, device=device, dtype=dtype, generator=generator)
    k = torch.randn(shape.k_len, args.num_kv_heads, args.head_dim, device=device, dtype=dtype, generator=generator)
    v = torch.randn(shape.k_len, args.num_kv_heads, args.head_dim, device=device, dtype=dtype, generator=generator)
    q_branch, k_branch = branch_layout(shape, args.branch_tokens, device)
    cu_q = torch.tensor([0, shape.q_len], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, shape.k_len], dtype=torch.int32, device=device)
    varlen = (q, k, v, cu_q, cu_k, shape.q_len, shape.k_len, None, True, q_branch, k_branch)
    group = args.num_heads // args.num_kv_heads

    # SDPA inputs in (B, H, T, D); the boolean mask is built once per step and shared by all layers, so untimed.
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, T, D)
    mask = branch_visibility_mask(shape.q_len, shape.k_len, True, q_branch, k_branch, device=device)[None, None]

    def kernel():
        return _flash_attn_varlen_forward(*varlen)

    def kernel_no_skip():
        return _flash_attn_varlen_forward(*varlen, skip_branch_blocks=False)

    def sdpa_mask():  # transformers' sdpa path with a mask: repeat K/V to all query heads, then SDPA
        return F.scaled_dot_product_attention(q4, repeat_kv(k4, group), repeat_kv(v4, group), attn_mask=mask)

    k_rep, v_rep = repeat_kv(k4, group), repeat_kv(v4, group)

    def sdpa_mask_prerepeated():
        return F.scaled_dot_product_attention(q4, k_rep, v_rep, attn_mask=mask)

    def sdpa_causal():  # plain causal without a mask: lets SDPA pick its flash backend
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)

    exact = flash_attn_varlen_reference(*varlen, out_dtype=torch.float64)
    kernel_err = (kernel().double() - exact).abs().max().item()
    sdpa_err = (sdpa_mask()[0].transpose(0, 1).double() - exact).abs().max().item()
    tolerance = TOLERANCE_FACTOR * sdpa_err + ULP[dtype] * max(1.0, exact.abs().max().item())
    del exact
    config = pick_launch_config(
        1,
        args.num_kv_heads,
        group,
        args.head_dim,
        shape.q_len,
        shape.k_len,
        gpu_info(device) if device.type == "cuda" else None,
    )
    row = {
        "shape": shape.name,
        "q": shape.q_len,
        "k": shape.k_len,
        "branches": shape.num_branches,
        "splits": config.num_splits,
        "kernel_err": kernel_err,
        "sdpa_err": sdpa_err,
        "ok": kernel_err <= tolerance,
        "kernel_ms": time_fn(kernel),
        "kernel_no_skip_ms": time_fn(kernel_no_skip) if shape.num_branches else float("nan"),
        "sdpa_mask_ms": time_fn(sdpa_mask),
        "sdpa_mask_prerepeated_ms": time_fn(sdpa_mask_prerepeated),
        "sdpa_causal_ms": time_fn(sdpa_causal) if shape.num_branches == 0 else float("nan"),
    }
    row["speedup"] = row["sdpa_mask_ms"] / row["kernel_ms"] if row["kernel_ms"] > 0 else float("nan")
    return row


COLUMNS = [
    ("shape", "shape", "{}"),
    ("q", "q", "{}"),
    ("k", "k", "{}"),
    ("splits", "splits", "{}"),
    ("kernel_ms", "kernel ms", "{:.4f}"),
    ("kernel_no_skip_ms", "kernel, no block skip ms", "{:.4f}"),
    ("sdpa_mask_ms", "SDPA+mask ms (repeat_kv)", "{:.4f}"),
    ("sdpa_mask_prerepeated_ms", "SDPA+mask ms (K/V pre-repeated)", "{:.4f}"),
    ("sdpa_causal_ms", "SDPA is_causal ms", "{:.4f}"),
    ("speedup", "speedup vs SDPA+mask", "{:.2f}x"),
    ("kernel_err", "max err kernel", "{:.2e}"),
    ("sdpa_err", "max err SDPA", "{:.2e}"),
    ("ok", "check", "{}"),
]


def format_table(rows: list[dict], header: str) -> str:
    def cell(row, key, fmt):
        value = row[key]
        if key == "ok":
            return "pass" if value else "FAIL"
        if isinstance(value, float) and value != value:  # NaN: column does not apply to this shape
            return "-"
        return fmt.format(value)

    lines = [
        header,
        "",
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell(row, key, fmt) for key, _, fmt in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/flash_bench.md", help="markdown file for the table")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--num-heads", type=int, default=28)
    parser.add_argument("--num-kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument(
        "--branch-tokens", type=int, default=64, help="tokens per branch (title included) before the timed decode step"
    )
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "flash_attn_branch.bench: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured",
            file=sys.stderr,
        )
        return 2
    from ._mode import interpreter_enabled

    if interpreter_enabled():
        print("flash_attn_branch.bench: TRITON_INTERPRET=1 is set; unset it to time compiled kernels", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")

    def time_fn(fn):
        return triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    rows = []
    for shape in default_shapes(args.branch_tokens):
        row = bench_shape(shape, args, device, time_fn)
        rows.append(row)
        print(
            f"{row['shape']}: kernel {row['kernel_ms']:.4f} ms, SDPA+mask {row['sdpa_mask_ms']:.4f} ms, "
            f"check {'pass' if row['ok'] else 'FAIL'}",
            flush=True,
        )
    header = (
        f"{torch.cuda.get_device_name(device)}, {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"triton {triton.__version__}, {args.dtype}, Hq={args.num_heads} Hkv={args.num_kv_heads} "
        f"D={args.head_dim}, {args.branch_tokens} tokens per branch, median of triton.testing.do_bench"
    )
    table = format_table(rows, header)
    print(table)
    if args.out:
        import os

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(table)
        print(f"wrote {args.out}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
