"""Host side of the branch-aware varlen attention: argument checks, launch configuration, kernel launch."""

import contextlib
import math
from dataclasses import dataclass

import torch

from ._mode import interpreter_enabled

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# Launch heuristics.  Split the key range over several programs (flash-decoding) only when the grid would otherwise
# leave the GPU mostly idle, and never give a split fewer key blocks than this.
MIN_KEY_BLOCKS_PER_SPLIT = 4
MAX_SPLITS = 64
TARGET_PROGRAMS_PER_SM = 2
# Under TRITON_INTERPRET=1 every program runs as numpy code on the CPU; 16-wide tiles keep tests short and still
# exercise partial blocks, several key blocks per tile and several tiles per sequence.
INTERPRETER_BLOCK = 16

_device_cache: dict[int, "GpuInfo"] = {}


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # rows of a query tile; a row is one (query, query head of the KV group) pair
    block_n: int  # keys per block
    num_splits: int  # programs sharing the key range of one tile (1 = no split)
    num_warps: int = 4
    num_stages: int = 2


def _kernels():
    from . import _kernels as kernels

    if kernels.INTERPRETED != interpreter_enabled():
        raise RuntimeError(
            "flash_attn_branch: TRITON_INTERPRET changed after the Triton kernels were first used "
            f"(kernels built with interpreter={kernels.INTERPRETED}); set it before the first call"
        )
    return kernels


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class GpuInfo:
    sm_count: int
    capability: int  # 90 for sm_90 (Hopper), 80 for sm_80 (Ampere), ...


def gpu_info(device: torch.device) -> GpuInfo:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_cache:
        props = torch.cuda.get_device_properties(index)
        _device_cache[index] = GpuInfo(props.multi_processor_count, props.major * 10 + props.minor)
    return _device_cache[index]


def pick_launch_config(
    batch: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    gpu: GpuInfo | None,
) -> LaunchConfig:
    """Tile sizes, split count, warps and pipeline stages for one call (`gpu=None`: the CPU interpreter).

    The tile sizes were chosen from what the compiler makes of them (`python -m flash_attn_branch.compile_check`:
    no register spills, pipelined key loop) on sm_90 and sm_80; they are not tuned by measurement yet.
    """
    rows = max(1, max_seqlen_q * group)
    if gpu is None:
        return LaunchConfig(block_m=INTERPRETER_BLOCK, block_n=INTERPRETER_BLOCK, num_splits=1)
    block_d = max(16, _next_power_of_2(head_dim))
    if block_d <= 64 or (block_d <= 128 and gpu.capability >= 90):
        # Hopper keeps Q in shared memory for wgmma, so 128-row tiles fit in registers up to D = 128.
        block_m = min(128, max(16, _next_power_of_2(rows)))
        block_n = 64
        num_warps = 8 if block_m == 128 else 4
        num_stages = 3 if block_d <= 64 else 2
    elif gpu.capability >= 90 or block_d <= 128:  # D = 128 before Hopper, D = 256 on Hopper
        block_m = min(64, max(16, _next_power_of_2(rows)))
        block_n = 64 if block_d <= 128 else 32
        num_warps = 8  # spreads the accumulator; 4 warps spill on sm_80
        num_stages = 2
    else:  # D = 256 before Hopper
        block_m = min(32, max(16, _next_power_of_2(rows)))
        block_n = 32
        num_warps = 4
        num_stages = 2
    num_m_tiles = triton_cdiv(rows, block_m)
    programs = num_m_tiles * batch * num_kv_heads
    key_blocks = triton_cdiv(max(1, max_seqlen_k), block_n)
    target = TARGET_PROGRAMS_PER_SM * gpu.sm_count
    num_splits = 1
    if programs < target and key_blocks >= 2 * MIN_KEY_BLOCKS_PER_SPLIT:
        num_splits = min(triton_cdiv(target, programs), key_blocks // MIN_KEY_BLOCKS_PER_SPLIT, MAX_SPLITS)
    return LaunchConfig(block_m, block_n, max(1, num_splits), num_warps, num_stages)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"flash_attn_varlen_func: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"flash_attn_varlen_func: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_varlen_args(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_branch, k_branch, interpreted: bool
) -> None:
    """Raise a one-line error naming the argument for anything the kernel cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 3)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"flash_attn_varlen_func: q.dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"flash_attn_varlen_func: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attn_varlen_func: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    head_dim = q.shape[2]
    if k.shape[2] != head_dim:
        raise ValueError(f"flash_attn_varlen_func: head dims differ: q has {head_dim}, k/v have {k.shape[2]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attn_varlen_func: head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"flash_attn_varlen_func: query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads})"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"flash_attn_varlen_func: {name} must be contiguous in its last (head_dim) dimension, "
                f"got strides {tuple(t.stride())}"
            )
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _check_tensor(name, t, 1)
        if t.dtype != torch.int32:
            raise TypeError(f"flash_attn_varlen_func: {name} must be int32, got {t.dtype}")
        if t.numel() < 2:
            raise ValueError(f"flash_attn_varlen_func: {name} needs batch + 1 >= 2 entries, got {t.numel()}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"flash_attn_varlen_func: cu_seqlens_q and cu_seqlens_k describe different batch sizes "
            f"({cu_seqlens_q.numel() - 1} vs {cu_seqlens_k.numel() - 1})"
        )
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"flash_attn_varlen_func: {name} must be a non-negative int, got {value!r}")
    if (q_branch is None) != (k_branch is None):
        raise ValueError("flash_attn_varlen_func: pass both q_branch and k_branch, or neither")
    if q_branch is not None:
        for name, t, total in (("q_branch", q_branch, q.shape[0]), ("k_branch", k_branch, k.shape[0])):
            _check_tensor(name, t, 1)
            if t.dtype != torch.int32:
                raise TypeError(f"flash_attn_varlen_func: {name} must be int32, got {t.dtype}")
            if t.numel() != total:
                raise ValueError(
                    f"flash_attn_varlen_func: {name} must have one id per token ({total}), got {t.numel()}"
                )
            if t.stride(0) != 1:
                raise ValueError(f"flash_attn_varlen_func: {name} must be contiguous")
    tensors = {"q": q, "k": k, "v": v, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k}
    if q_branch is not None:
        tensors.update(q_branch=q_branch, k_branch=k_branch)
    check_one_device(tensors)
    if cu_seqlens_q.device.type == "cpu":  # content checks need the values on the host; free only on the CPU
        for name, cu, total, max_len in (
            ("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
            ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k),
        ):
            check_cu_seqlens(name, cu, total, max_len)
    if not interpreted and q.device.type != "cuda":
        raise ValueError(
            f"flash_attn_varlen_func: tensors are on {q.device}; the Triton kernel needs CUDA tensors "
            "(set TRITON_INTERPRET=1 before the first call to run it on the CPU interpreter)"
        )


def check_one_device(tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor on the device of the first one (q): the kernel reads them all from one GPU."""
    (first, anchor), *rest = tensors.items()
    wrong = [f"{name} on {t.device}" for name, t in rest if t.device != anchor.device]
    if wrong:
        raise ValueError(
            f"flash_attn_varlen_func: all tensors must be on one device, but {first} is on {anchor.device} and "
            f"{', '.join(wrong)} (with layers on several GPUs, move the inputs to the layer's device first)"
        )


def launch_device(device: torch.device):
    """The context the kernels launch in: Triton launches on the *current* CUDA device (and its current stream),
    so the inputs' device is made current for the launch; CPU tensors (the interpreter) need nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_cu_seqlens(name: str, cu_seqlens: torch.Tensor, total: int, max_len: int) -> None:
    """Offsets start at 0, never decrease, end at the packed length, and no sequence exceeds max_len."""
    lengths = cu_seqlens[1:].long() - cu_seqlens[:-1].long()
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(
            f"flash_attn_varlen_func: {name} must rise from 0 to the packed length {total}, got {cu_seqlens.tolist()}"
        )
    if int(lengths.max()) > max_len:
        raise ValueError(
            f"flash_attn_varlen_func: a sequence has {int(lengths.max())} tokens but max_seqlen_{name[-1]} is {max_len}"
        )


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    q_branch: torch.Tensor | None = None,
    k_branch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Branch-aware varlen attention, FlashAttention-2 layout.

    q: (total_q, Hq, D); k, v: (total_k, Hkv, D) with Hq % Hkv == 0; sequences packed along dim 0 and delimited
    by int32 cu_seqlens_q / cu_seqlens_k of length batch + 1.  Causal masking is bottom-right aligned.  With
    q_branch (total_q,) and k_branch (total_k,) int32, key j is visible to query i only if k_branch[j] == -1 or
    k_branch[j] == q_branch[i].  A query that sees no key gets a zero output.  Returns (total_q, Hq, D) in q.dtype.
    """
    return _flash_attn_varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, q_branch, k_branch
    )


def _flash_attn_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    softmax_scale=None,
    causal=True,
    q_branch=None,
    k_branch=None,
    *,
    config: LaunchConfig | None = None,
    skip_branch_blocks: bool = True,
) -> torch.Tensor:
    """`flash_attn_varlen_func` with the launch configuration exposed (tests force splits and tile sizes)."""
    interpreted = interpreter_enabled()
    check_varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_branch, k_branch, interpreted)
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty((total_q, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if total_q == 0:
        return out
    if max_seqlen_q == 0:
        raise ValueError(f"flash_attn_varlen_func: max_seqlen_q is 0 but q holds {total_q} tokens")
    if k.shape[0] == 0 or max_seqlen_k == 0:
        return out.zero_()
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if config is None:
        config = pick_launch_config(
            batch,
            num_kv_heads,
            group,
            head_dim,
            max_seqlen_q,
            max_seqlen_k,
            None if interpreted else gpu_info(q.device),
        )
    kernels = _kernels()
    block_d = max(16, _next_power_of_2(head_dim))
    num_m_tiles = triton_cdiv(max_seqlen_q * group, config.block_m)
    key_blocks = triton_cdiv(max_seqlen_k, config.block_n)
    num_splits = max(1, min(config.num_splits, key_blocks))
    blocks_per_split = triton_cdiv(key_blocks, num_splits)
    num_splits = triton_cdiv(key_blocks, blocks_per_split)  # no split left without key blocks
    split = num_splits > 1
    if split:
        out_partial = torch.empty((num_splits, total_q, num_heads, head_dim), dtype=torch.float32, device=q.device)
        lse_partial = torch.empty((num_splits, total_q, num_heads), dtype=torch.float32, device=q.device)
    else:  # never read; any tensor keeps the pointer arguments typed
        out_partial, lse_partial = out, out
    has_branch = q_branch is not None
    grid = (num_m_tiles, batch * num_kv_heads, num_splits)
    with launch_device(q.device):  # Triton launches on the current device; make it the inputs' one
        kernels._branch_attn_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            out_partial,
            lse_partial,
            cu_seqlens_q,
            cu_seqlens_k,
            q_branch if has_branch else cu_seqlens_q,
            k_branch if has_branch else cu_seqlens_k,
            softmax_scale * math.log2(math.e),
            num_kv_heads,
            blocks_per_split,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            out_partial.stride(0) if split else 0,
            out_partial.stride(1) if split else 0,
            out_partial.stride(2) if split else 0,
            lse_partial.stride(0) if split else 0,
            lse_partial.stride(1) if split else 0,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            GROUP=group,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            CAUSAL=bool(causal),
            HAS_BRANCH=has_branch,
            SKIP_BRANCH_BLOCKS=bool(skip_branch_blocks),
            SPLIT=split,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            DOT_IN_FP32=interpreted and q.dtype == torch.bfloat16,
            INTERPRETER_LOOP=interpreted,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if split:
            kernels._combine_splits_kernel[(total_q, num_heads)](
                out,
                out_partial,
                lse_partial,
                num_splits,
                out.stride(0),
                out.stride(1),
                out_partial.stride(0),
                out_partial.stride(1),
                out_partial.stride(2),
                lse_partial.stride(0),
                lse_partial.stride(1),
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                BLOCK_S=max(2, _next_power_of_2(num_splits)),
                num_warps=4,
            )
    return out
