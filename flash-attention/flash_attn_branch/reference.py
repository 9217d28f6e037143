"""Eager reference for `flash_attn_varlen_func`: same signature, float64 by default, one sequence at a time."""

import math

import torch

from .visibility import SHARED, sees


def branch_visibility_mask(
    q_len: int,
    k_len: int,
    causal: bool = True,
    q_branch: torch.Tensor | None = None,
    k_branch: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(q_len, k_len) bool mask of one sequence, True where query i may see key j (:func:`.visibility.sees`).

    Causal is bottom-right aligned (query i sits at key index k_len - q_len + i); without ``causal`` every query sits
    after the last key. Without branch ids every key is shared.
    """
    if device is None:
        device = q_branch.device if q_branch is not None else "cpu"
    key_position = torch.arange(k_len, device=device)
    query_position = key_position.new_full((q_len,), k_len - 1)
    if causal:
        query_position = torch.arange(q_len, device=device) + (k_len - q_len)
    if q_branch is None or k_branch is None:
        q_branch = torch.zeros(q_len, dtype=torch.int32, device=device)
        k_branch = torch.full((k_len,), SHARED, dtype=torch.int32, device=device)
    return sees(
        query_position[:, None], q_branch.to(device)[:, None], key_position[None, :], k_branch.to(device)[None, :]
    )


def flash_attn_varlen_reference(
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
    compute_dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain softmax(QK^T * scale + mask) V per sequence, in `compute_dtype`; rows with no visible key are 0.

    `out_dtype` defaults to q.dtype (the kernel's contract); pass torch.float64 to keep the exact result.
    max_seqlen_q / max_seqlen_k are accepted for signature compatibility and only checked.
    """
    total_q, num_heads, head_dim = q.shape
    group = num_heads // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out = torch.zeros((total_q, num_heads, v.shape[2]), dtype=compute_dtype, device=q.device)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for seq in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[seq], starts_q[seq + 1], starts_k[seq], starts_k[seq + 1]
        if q1 - q0 > max_seqlen_q or k1 - k0 > max_seqlen_k:
            raise ValueError(f"flash_attn_varlen_reference: sequence {seq} is longer than max_seqlen_q/max_seqlen_k")
        if q1 == q0:
            continue
        qs = q[q0:q1].to(compute_dtype).transpose(0, 1)  # (Hq, Lq, D)
        ks = k[k0:k1].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Lk, D)
        vs = v[k0:k1].to(compute_dtype).repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Lk, D)
        visible = branch_visibility_mask(
            q1 - q0,
            k1 - k0,
            causal,
            None if q_branch is None else q_branch[q0:q1],
            None if k_branch is None else k_branch[k0:k1],
            device=q.device,
        )
        scores = (qs @ ks.transpose(1, 2)) * scale  # (Hq, Lq, Lk)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
        out[q0:q1] = (probs @ vs).transpose(0, 1)  # (Lq, Hq, D)
    return out.to(out_dtype if out_dtype is not None else q.dtype)
