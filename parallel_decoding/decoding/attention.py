"""Attention backends a decoder can run on: transformers' own (``sdpa``, ``eager``) and the project's Triton kernel.

The kernel (package ``flash_attn_branch`` in ``flash-attention/``) applies the tree mask from per-token branch ids,
so a decoder on it passes branch ids instead of a 4D mask (:func:`uses_branch_kernel`).

The fast decoder's compiled pass runs FlexAttention through a wrapper of the model's base implementation,
registered as ``arena_flex_sdpa`` or ``arena_flex_eager`` (``decoding/flex.py``): with no block mask the wrapper is
its base, unchanged, so :func:`set_attention` treats a model on the wrapper of ``base`` as already on ``base``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

from .backend import TreeRows
from .visibility import KERNEL_SOURCE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

FLEX_BASES = ("sdpa", "eager")  # the implementations the arena's flex wrapper can stand in for
BRANCH_KERNEL = "branch_attention"  # name flash_attn_branch.hf.register() uses (transformers reserves "flash")


class KernelUnavailable(ValueError):
    """The project's Triton kernel cannot be imported or registered."""


def uses_branch_kernel(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == BRANCH_KERNEL


def register_branch_kernel() -> str:
    """Register the project's Triton kernel with transformers; returns the attention name the decoders look for.

    An installed ``flash_attn_branch`` is used first, else the working tree's copy (as the kernel's own tests do).
    The name must be :data:`BRANCH_KERNEL`, or a decoder would build a 4D mask instead of passing branch ids.
    """
    try:
        from flash_attn_branch.hf import register
    except ImportError:
        sys.path.insert(0, str(KERNEL_SOURCE))
        try:
            from flash_attn_branch.hf import register
        except ImportError as e:
            raise KernelUnavailable(
                f"--attn_implementation flash_attention_2 needs the project's kernel package "
                f"flash_attn_branch (pip install -e flash-attention): {e}"
            ) from None
    name = register()
    if name != BRANCH_KERNEL:
        raise KernelUnavailable(f"the kernel registers as {name!r} but the decoders look for {BRANCH_KERNEL!r}")
    return name


class BranchKernel:
    """The project's Triton kernel (``flash_attn_branch``): it reads the rows' and the keys' branch ids and applies
    the rule itself, so a pass passes branch ids, not a mask. It runs in the reference decoder's passes."""

    name = BRANCH_KERNEL
    decoder: Literal["eager"] = "eager"

    def implementation(self, base: str) -> str:
        return BRANCH_KERNEL

    def arguments(self, rows: TreeRows) -> dict[str, Any]:
        return {"q_branch": rows.branch, "k_branch": rows.key_branch}


def kernel_interpreter_enabled() -> bool:
    """Whether Triton runs the kernel in its interpreter (CPU tensors, for correctness only)."""
    from flash_attn_branch._mode import interpreter_enabled

    return interpreter_enabled()


def flex_name(base: str) -> str:
    """The name the fast decoder's flex wrapper of ``base`` is registered under."""
    return f"arena_flex_{base}"


def base_attention(name: str | None) -> str | None:
    """The implementation a model on ``name`` attends with outside the fast decoder's passes: the base of a flex
    wrapper, else ``name`` itself."""
    for base in FLEX_BASES:
        if name == flex_name(base):
            return base
    return name


def switch_attention(model: PreTrainedModel, name: str) -> None:
    """The one place the package switches a model's attention implementation (transformers' registry name)."""
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def set_attention(model: PreTrainedModel, attn_implementation: str) -> None:
    """Switch the model to ``attn_implementation``; a no-op when it already runs it, or runs the fast decoder's flex
    wrapper of it (which is that implementation for every caller but the fast decoder)."""
    if base_attention(getattr(model.config, "_attn_implementation", None)) != attn_implementation:
        switch_attention(model, attn_implementation)
