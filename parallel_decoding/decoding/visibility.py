"""Which key a query sees: the one definition, ``flash_attn_branch.visibility.sees``, for every mask builder here.

The definition lives in the kernel package (``flash-attention/``) because that package imports nothing of this
one: its reference implementation applies the same function, and the project's Triton kernel, which keeps the rule
inline, is held to it by the tests. An installed ``flash_attn_branch`` is used first, else (not installed, or
installed from an older tree) the working tree's copy of that one module; it is plain torch, no Triton needed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

KERNEL_SOURCE = Path(__file__).resolve().parents[2] / "flash-attention"  # the working tree's copy of the package

try:
    from flash_attn_branch import visibility as _definition
except ImportError:  # not installed, or installed from a tree older than this rule: the working tree's copy
    _spec = importlib.util.spec_from_file_location(
        "flash_attn_branch_visibility", KERNEL_SOURCE / "flash_attn_branch" / "visibility.py"
    )
    if _spec is None or _spec.loader is None:
        raise ImportError(f"the visibility rule is in neither flash_attn_branch nor {KERNEL_SOURCE}") from None
    _definition = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_definition)

SHARED = _definition.SHARED  # branch id of the shared text (prompt, skeleton, merged answer)
sees = _definition.sees

__all__ = ["KERNEL_SOURCE", "SHARED", "sees"]
