"""Compile the kernels for NVIDIA GPUs without a GPU, and report what the compiler made of them.

    python -m flash_attn_branch.compile_check            # the launch configurations the wrapper picks for 7B shapes

The CPU interpreter runs the kernel as numpy code, so it cannot catch what only the compiler rejects (e.g. a
non-constexpr global) nor show performance problems.  This check compiles through Triton's CUDA backend to a cubin
(Triton ships ptxas; no driver or GPU is needed) with the argument specialization the JIT applies to 16-byte
aligned tensors and strides, then reports registers, spills, shared memory and whether the key loop's loads were
software-pipelined (async copies in the TTGIR).  Must run without TRITON_INTERPRET.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .interface import MAX_SPLITS, GpuInfo, pick_launch_config

# Arguments the JIT marks 16-divisible for aligned tensors and strides that are multiples of 16 (the usual case).
_ALIGNED_ARGS = (
    "Q",
    "K",
    "V",
    "Out",
    "OutPartial",
    "LsePartial",
    "CuSeqlensQ",
    "CuSeqlensK",
    "QBranch",
    "KBranch",
    "stride_qt",
    "stride_qh",
    "stride_kt",
    "stride_kh",
    "stride_vt",
    "stride_vh",
    "stride_ot",
    "stride_oh",
    "stride_ps",
    "stride_pt",
    "stride_ph",
    "stride_ls",
    "stride_lt",
)
_TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(frozen=True)
class Variant:
    label: str
    dtype: str
    head_dim: int
    group: int
    block_m: int
    block_n: int
    causal: bool
    has_branch: bool
    split: bool
    num_warps: int
    num_stages: int
    skip_branch_blocks: bool = True
    capability: int = 90


GPUS = {"H100": GpuInfo(sm_count=132, capability=90), "A100": GpuInfo(sm_count=108, capability=80)}
# (label, Hq, Hkv, head dim, q_len, k_len, has branch ids)
SHAPES = [
    ("decode b=16 k=8k", 28, 4, 128, 16, 8192, True),
    ("decode b=8 k=32k", 28, 4, 128, 8, 32768, True),
    ("tree prefill b=16 k=8k", 28, 4, 128, 256, 8192, True),
    ("causal prefill 4k", 28, 4, 128, 4096, 4096, False),
    ("decode b=16 k=8k D=64", 16, 8, 64, 16, 8192, True),
    ("prefill 1k D=256", 8, 8, 256, 1024, 1024, True),
]


def default_variants() -> list[Variant]:
    """The launch configurations `pick_launch_config` chooses for SHAPES on each GPU of GPUS (bf16)."""
    variants = []
    for gpu_name, gpu in GPUS.items():
        for label, num_heads, num_kv_heads, head_dim, q_len, k_len, has_branch in SHAPES:
            group = num_heads // num_kv_heads
            config = pick_launch_config(1, num_kv_heads, group, head_dim, q_len, k_len, gpu)
            variants.append(
                Variant(
                    f"{gpu_name} {label} ({config.block_m}x{config.block_n}, {config.num_warps} warps, "
                    f"{config.num_stages} stages, {config.num_splits} splits)",
                    "bf16",
                    head_dim,
                    group,
                    config.block_m,
                    config.block_n,
                    True,
                    has_branch,
                    config.num_splits > 1,
                    config.num_warps,
                    config.num_stages,
                    capability=gpu.capability,
                )
            )
    return variants


def compile_forward(variant: Variant):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _kernels

    if _kernels.INTERPRETED:
        raise RuntimeError("compile_check: unset TRITON_INTERPRET; the kernels were decorated for the interpreter")
    fn = _kernels._branch_attn_fwd_kernel
    pointer = "*" + _TRITON_DTYPES[variant.dtype]
    constexprs = dict(
        HEAD_DIM=variant.head_dim,
        BLOCK_D=max(16, 1 << (variant.head_dim - 1).bit_length()),
        GROUP=variant.group,
        BLOCK_M=variant.block_m,
        BLOCK_N=variant.block_n,
        CAUSAL=variant.causal,
        HAS_BRANCH=variant.has_branch,
        SKIP_BRANCH_BLOCKS=variant.skip_branch_blocks,
        SPLIT=variant.split,
        DOT_PRECISION="ieee" if variant.dtype == "fp32" else "tf32",
        DOT_IN_FP32=False,
        INTERPRETER_LOOP=False,
    )
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Q", "K", "V", "Out"):
            signature[name] = pointer
        elif name in ("OutPartial", "LsePartial"):
            signature[name] = "*fp32" if variant.split else pointer
        elif name in ("CuSeqlensQ", "CuSeqlensK", "QBranch", "KBranch"):
            signature[name] = "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in _ALIGNED_ARGS}
    source = ASTSource(fn, signature, constexprs, attrs)
    target = GPUTarget("cuda", variant.capability, 32)
    return triton.compile(
        source, target=target, options={"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    )


def compile_combine(head_dim: int, num_splits: int, capability: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _kernels

    fn = _kernels._combine_splits_kernel
    constexprs = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, 1 << (head_dim - 1).bit_length()),
        BLOCK_S=max(2, 1 << (num_splits - 1).bit_length()),
    )
    signature = {
        name: "constexpr"
        if name in constexprs
        else "*bf16"
        if name == "Out"
        else "*fp32"
        if name in ("OutPartial", "LsePartial")
        else "i32"
        for name in fn.arg_names
    }
    return triton.compile(
        ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", capability, 32), options={"num_warps": 4}
    )


def _ptxas() -> str:
    import triton

    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    if not found:
        raise RuntimeError("compile_check: Triton's bundled ptxas was not found")
    return found[0]


def resource_report(kernel) -> dict:
    """Registers and spills from `ptxas -v`, shared memory, and the number of async copies in the TTGIR."""
    ptx = kernel.asm["ptx"]
    arch = re.search(r"\.target (sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        result = subprocess.run(
            [_ptxas(), "-v", f"--gpu-name={arch}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    info = result.stderr
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    ttgir = kernel.asm["ttgir"]
    return {
        "arch": arch,
        "registers": registers,
        "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
        "shared_bytes": kernel.metadata.shared,
        "async_copies": len(re.findall(r"async_copy_global_to_local|async_tma_copy", ttgir)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="substring of the variant labels to compile")
    args = parser.parse_args(argv)
    from ._mode import interpreter_enabled

    if interpreter_enabled():
        print("compile_check: unset TRITON_INTERPRET to compile for the GPU", file=sys.stderr)
        return 2
    print("| variant | arch | registers | spill bytes | shared bytes | async copies in key loop |")
    print("|---|---|---|---|---|---|")
    problems = 0
    for variant in default_variants():
        if args.only and args.only not in variant.label:
            continue
        report = resource_report(compile_forward(variant))
        problems += report["spill_bytes"] > 0 or report["async_copies"] == 0
        print(
            f"| {variant.label} | {report['arch']} | {report['registers']} | {report['spill_bytes']} | "
            f"{report['shared_bytes']} | {report['async_copies']} |",
            flush=True,
        )
    if not args.only:
        report = resource_report(compile_combine(128, MAX_SPLITS))
        problems += report["spill_bytes"] > 0
        print(
            f"| combine splits ({MAX_SPLITS}, D=128) | {report['arch']} | {report['registers']} | "
            f"{report['spill_bytes']} | {report['shared_bytes']} | - |",
            flush=True,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
