"""Triton kernels of flash_attn_branch.

Imported lazily by `flash_attn_branch.interface` on the first call, because `@triton.jit` decides at decoration
time whether a kernel is compiled for the GPU or run by the CPU interpreter (`TRITON_INTERPRET=1`).

Forward kernel, one program per (query tile, sequence x KV head, key split):
  - grouped-query attention is "packed": the GROUP query heads that share one KV head are laid out as extra rows
    of the query tile (row r -> query r // GROUP, head kv_head * GROUP + r % GROUP), so every K/V block loaded
    from memory serves all of them; at decode time (a handful of queries) this turns GROUP tiny tiles into one.
  - online softmax in base 2 (`exp2`, scores pre-multiplied by log2(e)), fp32 statistics and accumulator.
  - visibility: causal (bottom-right aligned: query i of a sequence with Lq queries and Lk keys sits at key index
    Lk - Lq + i) and, with HAS_BRANCH, key j visible to query i iff k_branch[j] == -1 or k_branch[j] == q_branch[i].
  - key blocks after the tile's causal horizon are never visited (loop bound); with SKIP_BRANCH_BLOCKS a block whose
    keys are neither shared nor in the tile's [min, max] query-branch range is not read (its K/V loads are masked
    off; its scores are all -inf, so the online-softmax state passes through it unchanged).
  - SPLIT (flash-decoding): the key range is cut into `num_splits` chunks run by different programs, each writing a
    normalized fp32 partial output and its base-2 log-sum-exp; `_combine_splits_kernel` merges them.  Decode has
    few query tiles, so without splitting most of the GPU would idle on long contexts.
"""

import triton
import triton.language as tl

from ._mode import interpreter_enabled

# The mode these kernels were decorated in (compiled for the GPU, or run by the CPU interpreter).
INTERPRETED = interpreter_enabled()

_INT32_MAX = tl.constexpr(2147483647)
_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _attend_key_block(
    acc,
    m_i,
    l_i,
    q,
    q_idx,
    q_branch,
    k_base,
    v_base,
    k_branch,
    cols,
    col_valid,
    load_valid,
    offs_d,
    d_valid,
    stride_kt,
    stride_vt,
    qk_scale,
    diag,
    CAUSAL: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """One step of the online softmax over the key block `cols`; returns the updated (acc, m_i, l_i).

    Keys outside `load_valid` are not read (zeros); they must be invisible to every row of the tile.
    """
    kv_mask = load_valid[:, None] & d_valid[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    if DOT_IN_FP32:
        # Interpreter only: numpy has no bfloat16 matmul (the interpreter multiplies the raw bit patterns).
        k = k.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units

    visible = col_valid[None, :]
    if CAUSAL:
        visible = visible & (cols[None, :] <= (diag + q_idx)[:, None])
    if HAS_BRANCH:
        visible = visible & ((k_branch[None, :] == -1) | (k_branch[None, :] == q_branch[:, None]))
    qk = tl.where(visible, qk, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)  # P is rounded to the input dtype before the P @ V product, as in FlashAttention-2
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _key_block_step(
    acc,
    m_i,
    l_i,
    start_n,
    hi,
    q,
    q_idx,
    q_branch,
    q_branch_min,
    q_branch_max,
    KBranch,
    k_start,
    k_base,
    v_base,
    offs_n,
    offs_d,
    d_valid,
    stride_kt,
    stride_vt,
    qk_scale,
    diag,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    SKIP_BRANCH_BLOCKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Key block [start_n, start_n + BLOCK_N) of the loop.

    A block that no query of the tile can see (no shared key, branch ids outside the tile's query-branch range) is
    not read: its K/V loads are masked off, so no memory traffic.  The block is skipped by masking rather than by
    an `if` around the loads because Triton does not software-pipeline loads under a data-dependent branch (checked
    on the sm_90 TTGIR: the `if` version had no async copies and spilled registers).
    """
    cols = start_n + offs_n
    col_valid = cols < hi
    k_branch = cols  # placeholder, only read when HAS_BRANCH
    block_visible = col_valid
    if HAS_BRANCH:
        k_branch = tl.load(KBranch + k_start + cols, mask=col_valid, other=-1)
        if SKIP_BRANCH_BLOCKS:
            is_shared = col_valid & (k_branch == -1)
            is_private = col_valid & (k_branch != -1)
            k_branch_min = tl.min(tl.where(is_private, k_branch, _INT32_MAX), 0)
            k_branch_max = tl.max(tl.where(is_private, k_branch, _INT32_MIN), 0)
            has_shared = tl.max(is_shared.to(tl.int32), 0) > 0
            overlaps = (k_branch_min <= q_branch_max) & (k_branch_max >= q_branch_min)
            block_visible = col_valid & (has_shared | overlaps)
    return _attend_key_block(
        acc,
        m_i,
        l_i,
        q,
        q_idx,
        q_branch,
        k_base,
        v_base,
        k_branch,
        cols,
        col_valid,
        block_visible,
        offs_d,
        d_valid,
        stride_kt,
        stride_vt,
        qk_scale,
        diag,
        CAUSAL,
        HAS_BRANCH,
        DOT_PRECISION,
        DOT_IN_FP32,
    )


@triton.jit
def _branch_attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    OutPartial,
    LsePartial,
    CuSeqlensQ,
    CuSeqlensK,
    QBranch,
    KBranch,
    qk_scale,
    num_kv_heads,
    blocks_per_split,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    SKIP_BRANCH_BLOCKS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    INTERPRETER_LOOP: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1) // num_kv_heads
    kv_head = tl.program_id(1) % num_kv_heads
    pid_split = tl.program_id(2)

    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    k_start = tl.load(CuSeqlensK + seq)
    k_len = tl.load(CuSeqlensK + seq + 1) - k_start
    if pid_m * BLOCK_M >= q_len * GROUP:  # the grid is sized for the longest sequence
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP  # query index inside the sequence
    head = kv_head * GROUP + rows % GROUP  # query head
    row_valid = q_idx < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_tok = (q_start + q_idx).to(tl.int64)
    q_ptrs = Q + q_tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # Key range of this program: [lo, hi), relative to the sequence start.
    diag = k_len - q_len  # bottom-right alignment: query i sits at key index diag + i
    hi = k_len
    if CAUSAL:
        last_q = tl.minimum(q_len - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // GROUP)
        hi = tl.minimum(hi, diag + last_q + 1)  # nothing after the last query's diagonal is visible
    lo = 0
    if SPLIT:
        lo = pid_split * blocks_per_split * BLOCK_N
        hi = tl.minimum(hi, lo + blocks_per_split * BLOCK_N)

    q_branch = q_idx  # placeholder, only read when HAS_BRANCH
    q_branch_min = 0
    q_branch_max = 0
    if HAS_BRANCH:
        q_branch = tl.load(QBranch + q_start + q_idx, mask=row_valid, other=0)
        q_branch_min = tl.min(tl.where(row_valid, q_branch, _INT32_MAX), 0)
        q_branch_max = tl.max(tl.where(row_valid, q_branch, _INT32_MIN), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    if INTERPRETER_LOOP:
        # numpy >= 2.4 refuses int() on the interpreter's 1-element scalars, which `range` needs for a loop bound
        # read from memory; `while` only needs bool().  Compiled kernels keep the `for` loop, which Triton pipelines.
        start_n = lo
        while start_n < hi:
            acc, m_i, l_i = _key_block_step(
                acc,
                m_i,
                l_i,
                start_n,
                hi,
                q,
                q_idx,
                q_branch,
                q_branch_min,
                q_branch_max,
                KBranch,
                k_start,
                k_base,
                v_base,
                offs_n,
                offs_d,
                d_valid,
                stride_kt,
                stride_vt,
                qk_scale,
                diag,
                BLOCK_N,
                CAUSAL,
                HAS_BRANCH,
                SKIP_BRANCH_BLOCKS,
                DOT_PRECISION,
                DOT_IN_FP32,
            )
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _key_block_step(
                acc,
                m_i,
                l_i,
                start_n,
                hi,
                q,
                q_idx,
                q_branch,
                q_branch_min,
                q_branch_max,
                KBranch,
                k_start,
                k_base,
                v_base,
                offs_n,
                offs_d,
                d_valid,
                stride_kt,
                stride_vt,
                qk_scale,
                diag,
                BLOCK_N,
                CAUSAL,
                HAS_BRANCH,
                SKIP_BRANCH_BLOCKS,
                DOT_PRECISION,
                DOT_IN_FP32,
            )

    # Rows that saw no visible key (only possible with Lk < Lq or unusual branch ids) output 0, as FlashAttention-2.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out_mask = row_valid[:, None] & d_valid[None, :]
    if SPLIT:
        p_ptrs = (
            OutPartial
            + pid_split * stride_ps
            + q_tok[:, None] * stride_pt
            + head[:, None] * stride_ph
            + offs_d[None, :]
        )
        tl.store(p_ptrs, out, mask=out_mask)
        lse = m_i + tl.log2(l_safe)  # -inf for rows without a visible key in this split
        tl.store(LsePartial + pid_split * stride_ls + q_tok * stride_lt + head, lse, mask=row_valid)
    else:
        o_ptrs = Out + q_tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=out_mask)


@triton.jit
def _combine_splits_kernel(
    Out,
    OutPartial,
    LsePartial,
    num_splits,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out[t, h] = sum_s w_s * partial_s[t, h] / sum_s w_s with w_s = 2^(lse_s - max_s lse_s)."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < num_splits
    d_valid = offs_d < HEAD_DIM
    lse = tl.load(LsePartial + offs_s * stride_ls + tok * stride_lt + head, mask=s_valid, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)  # (BLOCK_S,)
    weight_sum = tl.sum(weight, 0)
    weight_sum = tl.where(weight_sum == 0.0, 1.0, weight_sum)
    p_ptrs = OutPartial + offs_s[:, None] * stride_ps + tok * stride_pt + head * stride_ph + offs_d[None, :]
    partial = tl.load(p_ptrs, mask=s_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    out = tl.sum(partial * weight[:, None], 0) / weight_sum
    tl.store(Out + tok * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_valid)
