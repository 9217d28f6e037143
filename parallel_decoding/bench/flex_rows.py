"""Does FlexAttention attend a tree pass right on this device? Each kernel against a dense reference, by row count.

    python -m parallel_decoding.bench.flex_rows --device cuda            # exit 1 if a kernel the arena uses is wrong

One attention call as the arena's compiled pass makes it (``flex.block_mask`` from the arena's block tables,
``enable_gqa``, the whole arena as keys), compiled, for each head shape and each number of query rows: once with
torch's own kernel choice (on CUDA, its split-KV decoding kernel for a short query whose grouped-query ratio is a
power of two) and once with the main kernel forced (``FORCE_USE_FLEX_ATTENTION``). Both are held to sdpa in
float32 under the dense backend's mask (``dense.dense_mask``) over the same keys. The text: a shared prefix, two
branches, then the pass's rows, which continue the branches and the shared text in turn.

``scripts/gpu_check.sh`` runs this first: on the first H200 run the compiled passes of several rows gave wrong
answers while one-row passes were right (docs/bench.md), and this table says which kernel is at fault. The arena
uses ``flex.kernel_options``; the exit status is 1 when the kernel it uses for a row count is off the reference.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from ..decoding import flex
from ..decoding.dense import PADDING, dense_mask
from ..decoding.visibility import SHARED

# (query heads, KV heads, head dim): the embedded model; Qwen2.5-3B's grouping (ratio 8); Qwen2.5-7B's (ratio 7).
SHAPES = ((4, 2, 48), (16, 2, 128), (28, 4, 128))
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
KERNELS = ("torch's choice", "main kernel")


@dataclass
class TreePass:
    """One pass's rows and the arena's keys. query (1, H_q, W, D); key, value (1, H_kv, C + 1, D)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slots: torch.Tensor  # (W,)
    branch: torch.Tensor  # (W,)
    first: torch.Tensor  # (W,)
    key_branch: torch.Tensor  # (padded slots,): every slot's branch id, PADDING past the arena
    tables: flex.BlockTables


def tree_pass(shape: tuple[int, int, int], rows: int, capacity: int, dtype, device, seed: int = 0) -> TreePass:
    """A prefix of shared text, two branches of 24 slots each, then ``rows`` rows: branch 1, branch 2 and shared
    text in turn (row 0 is branch 1), at the slots after the branches."""
    heads, kv_heads, dim = shape
    generator = torch.Generator().manual_seed(seed)
    prefix, branch_len = capacity // 4, 24
    start = prefix + 2 * branch_len
    if start + rows > capacity:
        raise ValueError(f"{rows} rows after {start} slots of text do not fit in {capacity} slots")
    slots_count = capacity + 1  # the arena's spare slot, as in KVArena
    key_branch = torch.full((flex.padded_slots(slots_count),), PADDING, dtype=torch.long)
    key_branch[:capacity] = SHARED
    key_branch[prefix : prefix + branch_len] = 1
    key_branch[prefix + branch_len : start] = 2
    branch = torch.tensor([(1, 2, SHARED)[i % 3] for i in range(rows)])  # (W,)
    slots = torch.arange(start, start + rows)  # (W,)
    key_branch[slots] = branch

    def normal(*size):
        return torch.randn(*size, generator=generator).to(dtype=dtype, device=device)

    key_branch = key_branch.to(device)
    tables = flex.BlockTables(key_branch, slots_count)
    tables.visit([(0, int(slots[-1]) + 1)])
    return TreePass(
        query=normal(1, heads, rows, dim),
        key=normal(1, kv_heads, slots_count, dim),
        value=normal(1, kv_heads, slots_count, dim),
        slots=slots.to(device),
        branch=branch.to(device),
        first=torch.zeros(rows, dtype=torch.long, device=device),
        key_branch=key_branch,
        tables=tables,
    )


def reference(tree: TreePass) -> torch.Tensor:
    """sdpa in float32 under the dense backend's mask, keys repeated per query head: (1, H_q, W, D)."""
    slots_count = tree.key.shape[2]
    mask = dense_mask(
        tree.key_branch[:slots_count],
        torch.arange(slots_count, device=tree.key.device),
        tree.slots,
        tree.branch,
        tree.first,
        torch.float32,
    )  # (1, 1, W, C + 1)
    groups = tree.query.shape[1] // tree.key.shape[1]
    key = tree.key.float().repeat_interleave(groups, dim=1)  # (1, H_kv, S, D) -> (1, H_q, S, D)
    value = tree.value.float().repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(tree.query.float(), key, value, attn_mask=mask)


def flex_call(query, key, value, tables, slots, branch, first, options):
    """The compiled call: the block mask built in the graph, as in the arena's pass. Returns (1, H_q, W, D)."""
    block_mask = flex.block_mask(tables, slots, branch, first)
    return flex.flex_attention(query, key, value, block_mask=block_mask, enable_gqa=True, kernel_options=options)


def kernel_error(tree: TreePass, options, compiled) -> float:
    """Max abs difference of one kernel's output from the reference."""
    out = compiled(tree.query, tree.key, tree.value, tree.tables, tree.slots, tree.branch, tree.first, options)
    return float((out.float() - reference(tree)).abs().max())


def check(shapes, row_counts, capacity: int, dtype, device) -> tuple[list[dict], bool]:
    """One row per (shape, row count): each kernel's max abs difference and whether the arena's kernel is right."""
    compiled = torch.compile(flex_call, fullgraph=True, dynamic=False)
    results, ok = [], True
    tolerance = TOLERANCE[dtype]
    for shape in shapes:
        for rows in row_counts:
            tree = tree_pass(shape, rows, capacity, dtype, device)
            errors = {
                KERNELS[0]: kernel_error(tree, None, compiled),
                KERNELS[1]: kernel_error(tree, {"FORCE_USE_FLEX_ATTENTION": True}, compiled),
            }
            arena_kernel = KERNELS[0] if flex.kernel_options(torch.device(device).type, rows) is None else KERNELS[1]
            right = errors[arena_kernel] <= tolerance
            ok &= right
            results.append({"shape": shape, "rows": rows, "errors": errors, "arena": arena_kernel, "right": right})
    return results, ok


def table(results: list[dict], dtype, device) -> str:
    lines = [
        f"FlexAttention on {device}, {str(dtype).removeprefix('torch.')}: max abs difference from sdpa in float32 "
        f"under the dense mask (tolerance {TOLERANCE[dtype]:g})",
        "",
        f"| H_q | H_kv | D | rows | {' | '.join(KERNELS)} | the arena uses | right |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        heads, kv_heads, dim = r["shape"]
        errors = " | ".join(f"{r['errors'][k]:.2e}" for k in KERNELS)
        right = "yes" if r["right"] else "NO"
        lines.append(f"| {heads} | {kv_heads} | {dim} | {r['rows']} | {errors} | {r['arena']} | {right} |")
    return "\n".join(lines)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        heads, kv_heads, dim = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is H_q,H_kv,D (three integers), not {text!r}") from None
    if min(heads, kv_heads, dim) < 1 or heads % kv_heads:
        raise argparse.ArgumentTypeError(f"shape {text}: positive sizes, and H_q a multiple of H_kv")
    return heads, kv_heads, dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel_decoding.bench.flex_rows", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=list(SHAPES), metavar="H_q,H_kv,D")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64], help="query rows of a pass")
    parser.add_argument("--capacity", type=int, default=2048, help="the arena's slots (keys: capacity + 1)")
    args = parser.parse_args(argv)
    if not flex.supported():
        parser.error(f"torch {torch.__version__} cannot build the arena's BlockMask (flex.supported())")
    if min(args.rows) < 1 or max(args.rows) > flex.BLOCK:
        parser.error(f"--rows: each between 1 and {flex.BLOCK} (one query block, as in the arena)")
    dtype = getattr(torch, args.dtype)
    try:
        results, ok = check(args.shapes, args.rows, args.capacity, dtype, args.device)
    except ValueError as e:
        parser.error(str(e))
    print(table(results, dtype, args.device))
    if not ok:
        print("flex_rows: the kernel the arena uses is off the reference for a row count marked NO", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
