"""transformers integration: run a stock decoder's attention through the branch-aware kernel.

    from flash_attn_branch.hf import register
    name = register()                        # "branch_attention"
    model.set_attn_implementation(name)      # or from_pretrained(..., attn_implementation=name)
    model(input_ids, position_ids=..., cache=..., q_branch=q_ids, k_branch=k_ids)

transformers forwards extra keyword arguments of `model(...)` down to the attention function, so the branch ids
reach the kernel without a 4D mask.  The registered mask function returns None: no mask is ever built.
The name must not contain "flash": transformers treats any such name as a FlashAttention / hub-kernel request
(`is_flash_attention_requested`) and tries to import it.
Without `q_branch`/`k_branch` the backend is plain causal attention (bottom-right aligned, i.e. the queries are the
last tokens of the keys, which holds for a DynamicCache; a StaticCache's padded key buffer is not supported).
"""

from functools import lru_cache

import torch

from .interface import flash_attn_varlen_func

DEFAULT_NAME = "branch_attention"


@lru_cache(maxsize=16)
def _cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """[0, seqlen, 2 * seqlen, ...] int32; cached because every layer of a forward asks for the same one."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def _branch_ids(name: str, ids, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"branch attention: {name} must be a torch.Tensor, got {type(ids).__name__}")
    ids = ids.reshape(-1)
    if ids.numel() != length:
        raise ValueError(
            f"branch attention: {name} has {ids.numel()} ids but this layer sees {length} "
            f"{'queries' if name == 'q_branch' else 'keys (cache included)'}"
        )
    return ids.to(device=device, dtype=torch.int32)


def branch_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface function.  query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) after the cache update.

    Optional kwargs `q_branch` (Tq,) and `k_branch` (Tk,) int ids (batch size 1 only).  Returns
    (attn_output (B, Tq, Hq, D), None), the layout transformers' attention functions return.
    """
    if dropout and module.training:
        raise NotImplementedError("branch attention: attention dropout is not supported (inference kernel)")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("branch attention: sliding-window layers are not supported")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("branch attention: logit softcapping is not supported")
    if attention_mask is not None:
        raise ValueError(
            "branch attention: got a materialized attention mask; pass branch ids as q_branch/"
            "k_branch instead of a 4D mask (this backend's mask function never builds one)"
        )
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads, k_len = key.shape[1], key.shape[2]
    q_branch, k_branch = kwargs.get("q_branch"), kwargs.get("k_branch")
    if (q_branch is None) != (k_branch is None):
        raise ValueError("branch attention: pass both q_branch and k_branch, or neither")
    if q_branch is not None:
        if batch != 1:
            raise ValueError(f"branch attention: branch ids need batch size 1, got {batch}")
        q_branch = _branch_ids("q_branch", q_branch, q_len, query.device)
        k_branch = _branch_ids("k_branch", k_branch, k_len, query.device)

    q = query.transpose(1, 2).reshape(batch * q_len, num_heads, head_dim)  # (B*Tq, Hq, D), a view when B == 1
    k = key.transpose(1, 2).reshape(batch * k_len, num_kv_heads, head_dim)  # (B*Tk, Hkv, D)
    v = value.transpose(1, 2).reshape(batch * k_len, num_kv_heads, value.shape[-1])  # (B*Tk, Hkv, D)
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        _cu_seqlens(batch, q_len, query.device),
        _cu_seqlens(batch, k_len, query.device),
        q_len,
        k_len,
        softmax_scale=scaling,
        causal=bool(causal),
        q_branch=q_branch,
        k_branch=k_branch,
    )
    return out.view(batch, q_len, num_heads, head_dim), None  # (B, Tq, Hq, D)


def branch_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> None:
    """AttentionMaskInterface function: the kernel masks by itself, so no mask is built.

    A 2D padding mask with zeros cannot be honoured (the kernel has no padding input) and raises.
    """
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("branch attention: padded batches are not supported; the 2D attention_mask has zeros")
    return None


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention and mask functions under `name` with transformers; returns `name`."""
    if "flash" in name:
        raise ValueError(
            f"register: name {name!r} contains 'flash', which transformers reserves for FlashAttention "
            "and hub kernels (it would try to import it); pick another name"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, branch_attention_forward)
    AttentionMaskInterface.register(name, branch_attention_mask)
    return name
