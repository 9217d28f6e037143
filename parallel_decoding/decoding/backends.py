"""The registry of attention backends (``decoding.backend.AttentionBackend``): every way a pass can attend.

    mask              the reference decoder, the model's sdpa or eager attention under a 4D tree mask
    branch_attention  the reference decoder, the project's Triton kernel reading branch ids (flash_attn_branch)
    flex              the fast decoder (KV arena, compiled step), FlexAttention over the written blocks only
    dense             the fast decoder, the model's attention under a dense mask over the arena

Adding a backend: one file with its class, and one line in ``BACKENDS`` below. The decoders look their backend up
here (``EagerDecoder`` by the model's attention implementation, ``FastDecoder`` by its ``attention`` argument), and
the command lines take their choices from :func:`arena_choices` and :data:`ATTN_IMPLEMENTATIONS`.
"""

from __future__ import annotations

from .attention import BRANCH_KERNEL, BranchKernel
from .backend import AttentionBackend
from .dense import DenseMask
from .flex import FlexMask
from .interface import EagerMask

BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend for backend in (EagerMask(), BranchKernel(), FlexMask(), DenseMask())
}

# What --attn_implementation takes: transformers' own implementations (the reference decoder's tree mask), and the
# project's kernel by its own name; ``flash_attention_2``, the reference implementation's spelling, is an alias.
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", BRANCH_KERNEL)
ATTN_ALIASES = {"flash_attention_2": BRANCH_KERNEL}


def attn_implementation(name: str) -> str:
    """``name`` as given on a command line, with an alias resolved; ValueError for an unknown one."""
    name = ATTN_ALIASES.get(name, name)
    if name not in ATTN_IMPLEMENTATIONS:
        choices = ", ".join([*ATTN_IMPLEMENTATIONS, *ATTN_ALIASES])
        raise ValueError(f"the attention implementation must be one of {choices}; got {name!r}")
    return name


def backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"no attention backend {name!r}; the registered ones are {', '.join(BACKENDS)}")
    return BACKENDS[name]


def eager_backend(attn_implementation: str | None) -> AttentionBackend:
    """The reference decoder's backend for a model on ``attn_implementation``: the kernel's own, else the mask."""
    return BACKENDS[BRANCH_KERNEL] if attn_implementation == BRANCH_KERNEL else BACKENDS["mask"]


def arena_choices() -> tuple[str, ...]:
    """The backends the fast decoder can run (its ``attention`` argument, besides "auto")."""
    return tuple(name for name, registered in BACKENDS.items() if registered.decoder == "arena")
