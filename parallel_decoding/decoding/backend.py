"""The attention-backend interface: how the query rows of one pass attend to the keys they see.

A decoder appends the rows of a pass (each at a key slot, with a branch id and the first slot it may see) and asks
its backend for the keyword arguments of the model call that carry the tree (:class:`AttentionBackend`): an
additive 4D mask, a FlexAttention ``BlockMask``, or the branch ids the project's Triton kernel reads. Every backend
applies the one rule of ``decoding.visibility``. The registry is ``decoding.backends``: adding a backend is one
file (a class with ``name``, ``decoder``, ``implementation`` and ``arguments``) and one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch


class KVBlocks(Protocol):
    """The block tables of a KV arena (``flex.BlockTables``): which key blocks a pass visits, on the device."""

    key_branch: torch.Tensor  # (N * BLOCK,) branch id per slot, padded to whole blocks
    kv_length: int
    kv_indices: torch.Tensor
    kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor


@dataclass
class TreeRows:
    """The query rows of one pass and the keys they may attend over (keys ``0 .. S - 1``, the rows' own included).

    ``slots``, ``branch``, ``first``: (T,) each row's key slot, branch id and first visible slot (the start of its
    request's region; 0 for a decoder of one answer). ``key_branch``: (S,) the branch id of every key slot.
    ``tables``: the arena's block tables, where the decoder has them (a FlexAttention pass visits those blocks).
    """

    slots: torch.Tensor
    branch: torch.Tensor
    first: torch.Tensor
    key_branch: torch.Tensor
    dtype: torch.dtype
    tables: KVBlocks | None = None


class AttentionBackend(Protocol):
    """One way a pass attends under the tree rule."""

    @property
    def name(self) -> str:
        """Its name in the registry (what ``FastDecoder(attention=...)`` and the command lines pick)."""
        ...

    @property
    def decoder(self) -> Literal["eager", "arena"]:
        """Which decoder runs it: the reference decoder (a ``DynamicCache``) or the fast one (a KV arena)."""
        ...

    def implementation(self, base: str) -> str:
        """The transformers attention implementation the model runs with this backend, given its own ``base``."""
        ...

    def arguments(self, rows: TreeRows) -> dict[str, Any]:
        """The keyword arguments of the model call that carry the tree for ``rows``."""
        ...
