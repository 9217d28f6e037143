"""Branch-aware FlashAttention-2-style varlen attention in Triton.

Key j is visible to query i iff causal (bottom-right aligned) and k_branch[j] in (-1, q_branch[i]): the one
definition is ``visibility.sees``, which the reference applies and the kernel's tests hold it to.
"""

from .interface import flash_attn_varlen_func
from .layout import branch_ids_for_engine_layout, branch_ids_from_reference_layout
from .reference import branch_visibility_mask, flash_attn_varlen_reference
from .visibility import SHARED, sees

__all__ = [
    "flash_attn_varlen_func",
    "flash_attn_varlen_reference",
    "branch_visibility_mask",
    "branch_ids_from_reference_layout",
    "branch_ids_for_engine_layout",
    "SHARED",
    "sees",
]
__version__ = "0.1.0"
